// Appended to emu.h and the kernel program: `emu_launch(name, grid, threads, args)` runs a
// kernel the way cuLaunchKernel does, its arguments passed as an array of pointers to them.
#include <cstring>
#include <numeric>
#include <utility>

namespace emu {
template <typename... P, std::size_t... I>
void call(void (*kernel)(P...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<P>>*>(args[I])...);
}

// The i-th thread to run in a phase whose number (block and phase index) is `phase`: forward,
// backward, and two interleavings by a stride coprime with the block size, in turn. On a GPU the
// threads of a phase run in any order, so a kernel whose result depends on it has a race: a
// thread reading memory another thread of its block writes in the same phase, with no barrier
// between them. Reordering makes such a kernel compute something else in some phase here, and
// its test against the CPU kernel fails: the emulator's race detector, deterministic (the same
// grid runs in the same orders) and free.
inline unsigned order(unsigned i, unsigned n, unsigned phase) {
    unsigned stride = n / 3 | 1;
    while (std::gcd(stride, n) != 1) stride += 2;
    switch (phase % 4) {
        case 0: return i;
        case 1: return n - 1 - i;
        case 2: return (unsigned)((unsigned long long)i * stride % n);
        default: return n - 1 - (unsigned)((unsigned long long)i * stride % n);
    }
}

// What the fiber of thread `current` runs.
inline void (*entry)(void**) = nullptr;
inline void** entry_args = nullptr;

inline void fiber_main() {
    entry(entry_args);
    (*fibers)[current].done = true;
    _longjmp(scheduler_at, 1);
}

template <typename... P>
int launch(void (*kernel)(P...), dim3 grid, unsigned threads, void** args) {
    static void (*k)(P...) = nullptr;
    k = kernel;
    entry = [](void** a) { call(k, a, std::index_sequence_for<P...>{}); };
    entry_args = args;
    gridDim = grid;
    blockDim = dim3{threads, 1, 1};
    // The fibers and their stacks live across launches (allocating them is most of the cost).
    static std::vector<Fiber> all;
    if (all.size() < threads) {
        all.resize(threads);
        for (auto& f : all)
            if (f.stack.empty()) f.stack.resize(64 * 1024);
    }
    std::vector<Fiber>& pool = all;
    fibers = &pool;
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                blockIdx = uint3{x, y, z};
                poison_shared();
                for (unsigned t = 0; t < threads; t++) {
                    Fiber& f = pool[t];
                    f.done = false;
                    f.started = false;
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = f.stack.data();
                    f.ctx.uc_stack.ss_size = f.stack.size();
                    f.ctx.uc_link = &scheduler;
                    makecontext(&f.ctx, fiber_main, 0);
                }
                // Phases: every live thread runs to its next barrier (or its end), in an order
                // that changes from phase to phase (see `order`).
                unsigned block = x + grid.x * (y + grid.y * z);
                for (unsigned phase = 0;; phase++) {
                    unsigned finished = 0;
                    for (unsigned i = 0; i < threads; i++) {
                        unsigned t = order(i, threads, block + phase);
                        if (pool[t].done) {
                            finished++;
                            continue;
                        }
                        current = t;
                        threadIdx = uint3{t, 0, 0};
                        if (_setjmp(scheduler_at) == 0) {
                            if (!pool[t].started) {
                                pool[t].started = true;
                                swapcontext(&scheduler, &pool[t].ctx);
                            } else {
                                _longjmp(pool[t].at, 1);
                            }
                        }
                        if (pool[t].done) finished++;
                    }
                    if (finished == threads) break;
                    if (finished != 0) return 3;  // some threads left while others wait at a barrier
                }
            }
    fibers = nullptr;
    return 0;
}
}  // namespace emu

#define EMU_KERNEL(name)                                   \
    if (std::strcmp(kernel, #name) == 0) {                 \
        return emu::launch(name, grid, threads, args);     \
    }

extern "C" int emu_launch(const char* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned threads, void** args) {
    if (threads == 0 || threads > 1024 || threads % 32 != 0) return 2;
    dim3 grid{gx, gy, gz};
    EMU_KERNEL(add_assign)
    EMU_KERNEL(narrow_bf16)
    EMU_KERNEL(narrow_f16)
    EMU_KERNEL(copy_u16)
    EMU_KERNEL(embedding_f32)
    EMU_KERNEL(embedding_bf16)
    EMU_KERNEL(embedding_f16)
    EMU_KERNEL(rms_norm)
    EMU_KERNEL(rope_interleaved)
    EMU_KERNEL(silu_mul)
    EMU_KERNEL(log_sigmoid_scaled)
    EMU_KERNEL(retention_recurrent)
    EMU_KERNEL(retention_gather)
    EMU_KERNEL(retention_scan)
    EMU_KERNEL(retention_decay_terms)
    EMU_KERNEL(retention_scatter)
    EMU_KERNEL(retention_add_incoming)
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
    EMU_KERNEL(emu_fixture_racy_shift)
    EMU_KERNEL(emu_fixture_fenced_shift)
    return 1;
}
