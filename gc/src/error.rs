//! Errors of gc and verify: each names the generation, blob or option at
//! fault and says what to do.

use ckpt_store::{Hash, StoreError};

/// Result type of this crate.
pub type Result<T, E = GcError> = std::result::Result<T, E>;

/// Everything that can go wrong in gc.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// No retention rule was given: gc would not know what to keep.
    #[error("give at least one --keep-* option (--keep-last N, --keep-within DURATION, --keep-hourly/--keep-daily/--keep-weekly N or --keep GEN); gc never guesses what to keep")]
    NoPolicy,
    /// A `--keep-within` duration that does not parse.
    #[error("duration {given:?} is not valid: use a number and a unit, e.g. 30s, 30m, 2h, 7d, 2w (or combinations like 1d12h)")]
    BadDuration {
        /// The text given.
        given: String,
    },
    /// `--keep GEN` names a generation that does not exist.
    #[error("--keep {id}: generation {id} is not in the store; it has {existing}; see `ckpt log`")]
    NoSuchGeneration {
        /// The id given.
        id: u64,
        /// The ids that exist.
        existing: String,
    },
    /// The repack threshold is out of range.
    #[error("--repack-threshold {0}: give a fraction between 0 and 1 (e.g. 0.5 repacks packs less than half live; 0 never repacks)")]
    BadThreshold(f64),
    /// A kept generation's metadata cannot be read: gc cannot know what it
    /// needs, so it deletes nothing.
    #[error("generation {generation} cannot be read ({what}); gc deleted nothing: run `ckpt verify --all` and repair the store first")]
    Unreadable {
        /// The generation.
        generation: u64,
        /// What failed (names the blob and pack).
        what: String,
    },
    /// A chunk-list node of a kept generation is malformed.
    #[error("chunk-list node {node} is {len} bytes, not a list of at most {max} hashes; gc deleted nothing: run `ckpt verify --all`")]
    BadNode {
        /// The node's address.
        node: Hash,
        /// Its size.
        len: usize,
        /// Largest valid size in hashes.
        max: usize,
    },
    /// The writer lock stayed taken (a checkpoint or another gc).
    #[error("store {store} stayed locked by another ckpt process for {waited}s ({source}); try again later or raise --wait")]
    LockTimeout {
        /// The store.
        store: String,
        /// Seconds waited.
        waited: u64,
        /// The last lock error.
        #[source]
        source: StoreError,
    },
    /// A store error.
    #[error(transparent)]
    Store(#[from] StoreError),
}
