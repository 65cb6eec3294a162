//! `libckpt_preload.so`: the checkpoint agent that `ckpt launch` injects into
//! every process of a computation with `LD_PRELOAD`.
//!
//! Role: register the process with the coordinator, and on request stop every
//! thread of the process in a known state so that the coordinator can read the
//! process from outside (`/proc`, `process_vm_readv`), then let it go again.
//! It also protects its signal from the application (see [`interpose`]).
//!
//! What it must never do: allocate, take a lock or call anything that is not
//! async-signal-safe while threads are stopped (a stopped thread may hold
//! malloc's lock); run an async runtime, SQLite, an HTTP client or any other
//! heavy machinery inside the user's process (hashing, compression and storage
//! happen in the coordinator); keep any fd in the program's way (its one
//! socket sits at a high fd number with `O_CLOEXEC`).
//!
//! It also exports the entry points of ckpt's C API (`libckpt/ckpt.h`,
//! found by `libckpt.so` at run time): callbacks around checkpoints and
//! the program's own checkpoint requests ([`hooks`]).
//!
//! Everything here runs inside the user's process. The code reachable from
//! the signal handler ([`suspend`]) and from the checkpoint exchange
//! ([`agent::checkpoint`]) uses only raw syscalls and static storage.

mod agent;
mod agentfds;
mod channel;
mod hooks;
mod interpose;
mod stopper;
mod suspend;
mod sys;

/// Runs when the dynamic loader maps the library, before the program's `main`.
extern "C" fn init() {
    agent::start();
}

#[used]
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn() = init;
