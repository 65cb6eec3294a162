//! The process model of ckpt, shared by the coordinator and the CLI.
//!
//! Role: everything about a Linux process that a checkpoint records and a
//! restart recreates: the `/proc` readers ([`procfs`]), the image manifest
//! ([`image`]), taking an image of a stopped process ([`capture`]), its open
//! file descriptors one module per kind, shared across the processes of a
//! computation ([`fds`]), and the restart driver that recreates a whole
//! computation, process tree and all, through the freestanding restorer
//! ([`restore`], [`plan`]). Memory is moved with
//! `process_vm_readv`/`process_vm_writev` ([`remote`]); what is copied out
//! of a stopped process goes through [`stopcopy`] into [`copybuf`]'s kept
//! buffers.
//!
//! What it must never do: run inside the checkpointed program (that is the
//! preload agent's job), talk to the coordinator's clients, or know how
//! blobs are laid out on disk (that is the store's).

pub mod capture;
pub mod chunklist;
pub mod copybuf;
pub mod creds;
pub mod dirty;
pub mod error;
pub mod fds;
pub mod image;
pub mod jobstop;
pub mod memattrs;
pub mod ns;
pub mod leftovers;
pub mod pages;
pub mod plan;
pub mod probe;
pub mod procfs;
pub mod remote;
pub mod restore;
pub mod signals;
pub mod sysv;
pub mod stopcopy;
pub mod sysvipc;
pub mod tmpfiles;

pub use error::{EngineError, Problem, Result};
