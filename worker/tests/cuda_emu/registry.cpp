// Appended to emu.h and the kernel program: `emu_launch(name, grid, threads, args)` runs a
// kernel the way cuLaunchKernel does, its arguments passed as an array of pointers to them.
#include <cstring>
#include <utility>

namespace emu {
template <typename... P, std::size_t... I>
void call(void (*kernel)(P...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<P>>*>(args[I])...);
}

template <typename... P>
void launch(void (*kernel)(P...), dim3 grid, unsigned threads, void** args) {
    gridDim = grid;
    blockDim = dim3{threads, 1, 1};
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                blockIdx = uint3{x, y, z};
                std::barrier<> barrier((std::ptrdiff_t)threads);
                block_barrier = &barrier;
                std::vector<std::thread> pool;
                for (unsigned t = 0; t < threads; t++)
                    pool.emplace_back([=] {
                        threadIdx = uint3{t, 0, 0};
                        call(kernel, args, std::index_sequence_for<P...>{});
                    });
                for (auto& th : pool) th.join();
            }
}
}  // namespace emu

#define EMU_KERNEL(name)                     \
    if (std::strcmp(kernel, #name) == 0) {   \
        emu::launch(name, grid, threads, args); \
        return 0;                            \
    }

extern "C" int emu_launch(const char* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned threads, void** args) {
    if (threads == 0 || threads > 1024 || threads % 32 != 0) return 2;
    dim3 grid{gx, gy, gz};
    EMU_KERNEL(add_assign)
    EMU_KERNEL(narrow_bf16)
    EMU_KERNEL(narrow_f16)
    EMU_KERNEL(embedding_f32)
    EMU_KERNEL(embedding_bf16)
    EMU_KERNEL(embedding_f16)
    EMU_KERNEL(rms_norm)
    EMU_KERNEL(rope_interleaved)
    EMU_KERNEL(silu_mul)
    EMU_KERNEL(log_sigmoid_scaled)
    EMU_KERNEL(retention_recurrent)
    EMU_KERNEL(retention_chunkwise)
    EMU_KERNEL(window_attention)
    EMU_KERNEL(kv_write_f32)
    EMU_KERNEL(kv_write_bf16)
    EMU_KERNEL(kv_write_f16)
    EMU_KERNEL(cross_attention_partials_f32)
    EMU_KERNEL(cross_attention_partials_bf16)
    EMU_KERNEL(cross_attention_partials_f16)
    EMU_KERNEL(lse_merge)
    EMU_KERNEL(argmax_rows)
    EMU_KERNEL(log_softmax_rows)
    return 1;
}
