//! Sockets: what every connection yoco accepts gets (`listen`), and TLS (`tls`).

pub mod listen;
pub mod tls;
