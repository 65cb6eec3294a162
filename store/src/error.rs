//! Errors of the store: each names the thing at fault and says what to do.

use std::path::PathBuf;

use ckpt_chunker::Hash;

/// Result type of this crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL names a backend this build does not support (yet).
    #[error("store URL {url:?}: {reason}")]
    Unsupported {
        /// The URL as given.
        url: String,
        /// What is unsupported and what to use instead.
        reason: String,
    },
    /// `Store::open` on a directory that does not exist.
    #[error(
        "store {path} does not exist: create it first (e.g. `ckpt launch` creates the default store) or check the path / $CKPT_STORE"
    )]
    NoSuchStore {
        /// Directory that was looked for.
        path: PathBuf,
    },
    /// The directory is not a store (no catalog.db and not empty, or not a
    /// directory at all).
    #[error("{path} is not a ckpt store (no catalog.db): choose an empty or new directory")]
    NotAStore {
        /// The directory.
        path: PathBuf,
    },
    /// The store's directory cannot be read by this user (another user's:
    /// stores are private, 0700).
    #[error(
        "store {path} is not readable by you (uid {me}; the directory is uid {owner}'s, mode {mode:o}): a store is private to the user who made it; use a store of your own (drop --store for the default, or pull a copy)"
    )]
    NotReadable {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Its mode bits.
        mode: u32,
        /// The effective uid of this process.
        me: u32,
    },
    /// The catalog was written by a newer ckpt.
    #[error(
        "catalog at {path} has schema version {found}, newer than this ckpt supports ({supported}): upgrade ckpt"
    )]
    NewerSchema {
        /// Path of catalog.db.
        path: PathBuf,
        /// Version found in the file.
        found: u32,
        /// Newest version this build understands.
        supported: u32,
    },
    /// catalog.db exists but is not a usable SQLite catalog.
    #[error(
        "catalog at {path} is damaged: {reason}; restore it from a backup or rebuild it from the pack files"
    )]
    BadCatalog {
        /// Path of catalog.db.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Another process holds the writer lock.
    #[error(
        "store {store} is in use by another ckpt process ({holder}); wait for it to finish or use another store"
    )]
    Locked {
        /// Store directory or URL.
        store: String,
        /// Who holds the lock: the pid from the lock file, or for an S3
        /// store the host, pid, age and lease from its lock object.
        holder: String,
    },
    /// The S3 writer lock was taken away (broken as stale by another
    /// writer) while this one held it: nothing more is uploaded.
    #[error(
        "lost the writer lock {object} ({reason}); the catalog was not uploaded, so nothing on S3 changed; the local cache uploads it with the next write if S3 did not move on"
    )]
    LockLost {
        /// The lock object's URL.
        object: String,
        /// What happened.
        reason: String,
    },
    /// `generation(id)` for an id that is not committed.
    #[error("generation {id} not found in store {path}; it has {existing}; see `ckpt log`")]
    GenerationNotFound {
        /// Requested id.
        id: u64,
        /// Store directory.
        path: PathBuf,
        /// Human-readable list of the existing generation ids.
        existing: String,
    },
    /// A blob the caller asked for is not in the catalog.
    #[error(
        "blob {hash} is not in store {path}: the image refers to data the store does not hold; run `ckpt verify`"
    )]
    BlobNotFound {
        /// The blob's address.
        hash: Hash,
        /// Store directory.
        path: PathBuf,
    },
    /// The catalog names a pack file that is not on disk.
    #[error(
        "pack file {pack} (holding blob {hash}) is missing: the store is damaged; run `ckpt verify` and restore the pack from a copy of the store"
    )]
    MissingPack {
        /// Expected path of the pack file.
        pack: PathBuf,
        /// A blob that lives in it.
        hash: Hash,
    },
    /// A blob's bytes are damaged (truncated, fail to decompress, or hash to
    /// something else).
    #[error(
        "blob {hash} in pack file {pack} is corrupt ({reason}); run `ckpt verify` and restore the pack from a copy of the store"
    )]
    Corrupt {
        /// Path of the pack file.
        pack: PathBuf,
        /// The blob's address.
        hash: Hash,
        /// What check failed.
        reason: String,
    },
    /// A name read from the catalog or from an S3 listing is not one ckpt
    /// makes (a pack name is 64 lowercase hex digits): it is never used.
    #[error(
        "{what} name {name:?} in {origin} is not one ckpt makes (a pack is named by 64 lowercase hex digits): the store may have been tampered with; nothing was read or deleted by that name; run `ckpt verify` and restore the store from a copy you trust"
    )]
    BadName {
        /// The catalog file, or the S3 URL of the listing.
        origin: PathBuf,
        /// What kind of name.
        what: &'static str,
        /// The name as found.
        name: String,
    },
    /// A store entry is readable or writable by other users and this
    /// process may not tighten it.
    #[error(
        "{path} (mode {mode:o}) in store {root} is open to other users, and it is not yours to fix: memory images hold secrets; have its owner run `chmod -R go= {root}`"
    )]
    NotPrivate {
        /// The loose entry.
        path: PathBuf,
        /// Its mode.
        mode: u32,
        /// The store directory.
        root: PathBuf,
    },
    /// Another coordinator owns the store.
    #[error(
        "store {store} already belongs to a running computation ({holder}): one store serves one computation; stop that one (`ckpt quit --coord ADDR`) or give this one another store (--store or $CKPT_STORE)"
    )]
    Owned {
        /// The store.
        store: String,
        /// Who owns it: pid, host, address, since when.
        holder: String,
    },
    /// Invalid chunk size for a new store.
    #[error(
        "chunk size {size} is invalid: it must be a non-zero multiple of 4096 bytes, at most 64 MiB (default {default})"
    )]
    InvalidChunkSize {
        /// The rejected size.
        size: usize,
        /// The default.
        default: usize,
    },
    /// A blob or generation the caller built is not acceptable.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// File-system error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the file.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// SQLite error.
    #[error("catalog {path}: {source}")]
    Sqlite {
        /// Path of catalog.db.
        path: PathBuf,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },
    /// An S3 request failed (see [`RemoteError`]).
    #[error(transparent)]
    Remote(Box<RemoteError>),
    /// A generation committed in the local cache of an S3 store could not
    /// be uploaded.
    #[error(
        "generation {id} is committed in the local cache {cache} but not uploaded to {url}: {source}; it goes up with the next checkpoint, or run `ckpt push {url} --store {cache}`"
    )]
    NotUploaded {
        /// The generation.
        id: u64,
        /// The S3 store.
        url: String,
        /// Its cache directory.
        cache: PathBuf,
        /// Why.
        #[source]
        source: Box<StoreError>,
    },
    /// A sealed store opened on a machine that has no key for it.
    #[error(
        "store {store} is sealed (store id {id}) and this machine has no key for it (looked in {path}): on the machine that made it run `ckpt key export --store {store} FILE`, copy FILE here privately, then `ckpt key import FILE` (or point $CKPT_KEY_FILE at it)"
    )]
    NoKey {
        /// The store's URL.
        store: String,
        /// Its store id.
        id: String,
        /// Where the key was looked for.
        path: PathBuf,
    },
    /// A key file that is not this store's key.
    #[error(
        "the key in {path} is not the key of store {store} (store id {id}): import the right one with `ckpt key import FILE`, or unset $CKPT_KEY_FILE"
    )]
    WrongKey {
        /// The store's URL.
        store: String,
        /// Its store id.
        id: String,
        /// The key file.
        path: PathBuf,
    },
    /// A key file or head record that cannot be used.
    #[error("key file {path} cannot be used: {reason}")]
    BadKeyFile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Something the catalog says fails its authentication with the key.
    #[error(
        "store {store} has been tampered with: {what}; nothing was restarted or changed; run `ckpt verify --store {store}` to see everything altered, and restore the store from a copy you trust"
    )]
    Tampered {
        /// The store's URL.
        store: String,
        /// What was altered (naming the generation row, pack or blob).
        what: String,
    },
    /// The catalog is older than the newest generation this machine saw.
    #[error(
        "store {store} holds an older catalog than this machine last saw: its newest generation is {found}, but generation {head} was committed or seen here (head record {head_path}): someone replayed an old copy of the catalog; restore the newest copy. If you rolled the store back yourself on purpose, delete {head_path} to accept it"
    )]
    Replayed {
        /// The store's URL.
        store: String,
        /// Newest generation in the catalog (0: none).
        found: u64,
        /// The head record's generation.
        head: u64,
        /// The head record file.
        head_path: PathBuf,
    },
    /// Error returned by a caller's callback (e.g. the sink of `read_blobs`).
    #[error("{0}")]
    Callback(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl From<RemoteError> for StoreError {
    fn from(e: RemoteError) -> StoreError {
        StoreError::Remote(Box::new(e))
    }
}

impl StoreError {
    /// Wrap any error produced inside a caller's callback.
    pub fn callback(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StoreError {
        StoreError::Callback(e.into())
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> StoreError {
        StoreError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Attach a file-system context to an `io::Result`.
pub(crate) trait IoCtx<T> {
    fn ctx(self, f: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoCtx<T> for std::io::Result<T> {
    fn ctx(self, f: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| StoreError::io(f(), e))
    }
}

/// Attach the catalog path to a `rusqlite::Result`.
pub(crate) trait SqlCtx<T> {
    fn db(self, path: &std::path::Path) -> Result<T>;
}

impl<T> SqlCtx<T> for rusqlite::Result<T> {
    fn db(self, path: &std::path::Path) -> Result<T> {
        self.map_err(|source| StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Errors talking to S3, each naming the object or bucket and the fix.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The URL is not `s3://BUCKET[/PREFIX]`.
    #[error("store URL {url:?}: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The endpoint does not answer.
    #[error(
        "cannot reach the S3 endpoint {endpoint} ({what} {object}): {detail}; check that the server runs and that AWS_ENDPOINT_URL names it"
    )]
    Unreachable {
        /// Endpoint URL.
        endpoint: String,
        /// Operation.
        what: String,
        /// Object URL.
        object: String,
        /// Error text.
        detail: String,
    },
    /// Credentials refused.
    #[error(
        "S3 refused access to {object} ({what}): {detail}; check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) and the permissions on bucket {bucket}"
    )]
    AccessDenied {
        /// Bucket.
        bucket: String,
        /// Operation.
        what: String,
        /// Object URL.
        object: String,
        /// Error text.
        detail: String,
    },
    /// The bucket does not exist.
    #[error(
        "bucket {bucket} does not exist at {endpoint}: create it first (e.g. `aws s3 mb s3://{bucket}`) or fix the store URL"
    )]
    NoSuchBucket {
        /// Bucket.
        bucket: String,
        /// Endpoint.
        endpoint: String,
    },
    /// The prefix holds no store.
    #[error(
        "{url} holds no ckpt store (no {object}): push one there first (`ckpt push {url}`), or create it with `ckpt launch --store {url}`"
    )]
    NoSuchStore {
        /// Store URL.
        url: String,
        /// Catalog object URL.
        object: String,
    },
    /// An object the catalog names is missing.
    #[error(
        "{object} is missing from S3, though the catalog names it: the remote store is damaged; push the store again from a complete copy (`ckpt push`)"
    )]
    MissingObject {
        /// Object URL.
        object: String,
    },
    /// An object's bytes are wrong (size or hash).
    #[error(
        "{object} is corrupt on S3 ({reason}); push the store again from a good copy (`ckpt push`) and run `ckpt verify`"
    )]
    CorruptObject {
        /// Object URL.
        object: String,
        /// What check failed.
        reason: String,
    },
    /// Source and destination both have generations the other lacks.
    #[error("{reason}")]
    Diverged {
        /// Which generations and what to do.
        reason: String,
    },
    /// Anything else the server said.
    #[error("S3 {what} {object} failed: {detail}")]
    Other {
        /// Operation.
        what: String,
        /// Object URL.
        object: String,
        /// Error text.
        detail: String,
    },
}
