//! S3-compatible object storage behind a store (`s3://BUCKET/PREFIX`).
//!
//! An S3 store is a normal local store in a cache directory plus a remote
//! copy of it:
//!
//! ```text
//! s3://BUCKET/PREFIX/catalog.db               a consistent snapshot of the catalog
//! s3://BUCKET/PREFIX/packs/<hh>/<hex>.pack    the pack files, byte for byte
//!
//! $CKPT_S3_CACHE or $XDG_CACHE_HOME/ckpt/s3/<bucket>/<hash of endpoint+prefix>/
//!     catalog.db, packs/, tmp/, lock          the local store (see the crate doc)
//!     synced-etag                             ETag of the remote catalog the local one equals
//!     unsynced                                present while local commits are not uploaded
//! ```
//!
//! * Writers commit locally, then upload the commit's new packs (multipart
//!   for large ones) and then a snapshot of the catalog (`VACUUM INTO`):
//!   packs strictly before the catalog that names them, so a reader of the
//!   remote never sees a generation whose data is missing. A failed upload
//!   leaves the `unsynced` marker; the next writer (or `ckpt push`) uploads
//!   whatever the remote lacks before anything else.
//! * Opening the store downloads the remote catalog when its ETag differs
//!   from the one the cache holds. Pack files are never downloaded for a
//!   read: the blobs a restart needs are fetched with ranged GETs, coalesced
//!   per pack, and BLAKE3-verified like local blobs.
//! * [`push`] / [`pull`] copy a whole store between a local directory and
//!   S3, sending only the packs the other side lacks (by name, which is the
//!   pack's BLAKE3, and size), then the catalog: re-running an interrupted
//!   copy skips what is already there.
//!
//! Configuration comes from the usual variables: `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` /
//! `AWS_DEFAULT_REGION` and `AWS_ENDPOINT_URL` (for S3-compatible servers,
//! path-style requests). Plain `http://` endpoints are allowed on loopback
//! addresses, or anywhere with `AWS_ALLOW_HTTP=true`.
//!
//! The object_store client is async; this module hides it behind a blocking
//! API with a private current-thread tokio runtime per [`Remote`].
//!
//! One writer at a time: the cache directory's `lock` keeps writers on one
//! host apart, and the lock object `s3://BUCKET/PREFIX/lock` (a conditional
//! PUT, see [`crate::remote_lock`]) keeps writers on different hosts apart.
//! A writer first uploads what an earlier, interrupted write of its cache
//! left unsynced, unless another writer changed the remote catalog since:
//! then those local commits (never acknowledged as uploaded) are dropped
//! and the remote catalog is taken, so a stale cache never overwrites
//! someone else's generations.
//!
//! Maintenance (`ckpt gc`) works on the cache's catalog and then publishes
//! it in the same order: new packs, then the catalog, and only then deletes
//! the remote packs the uploaded catalog no longer names
//! ([`crate::Writer::remove_remote_packs`]).

use std::collections::HashMap;
use std::fs::{self, File};
use std::future::Future;
use std::io::{Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjPath;
use object_store::{ClientOptions, ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig, WriteMultipart};
use rusqlite::Connection;

use crate::error::{IoCtx, Result, StoreError};
use crate::remote_lock::RemoteLock;

/// Name of the catalog object under the prefix.
pub const CATALOG_OBJECT: &str = "catalog.db";
/// Objects at least this large are uploaded in parts.
pub const MULTIPART_THRESHOLD: u64 = 8 << 20;
/// Size of one part of a multipart upload.
const PART_SIZE: usize = 8 << 20;
/// Packs fetched or sent at once.
pub const CONCURRENCY: usize = 8;
/// Ranges of one object closer than this are fetched in one GET.
pub const COALESCE_GAP: u64 = 256 << 10;

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

/// Outcome of [`Remote::put_if`].
#[derive(Debug)]
pub(crate) enum CondPut {
    /// Written; the new ETag.
    Written(String),
    /// The condition failed: nothing was written.
    Refused,
}

/// Size and ETag of a remote object.
#[derive(Clone, Debug)]
pub struct ObjectInfo {
    /// Bytes.
    pub size: u64,
    /// ETag, if the server gave one.
    pub etag: Option<String>,
}

/// Is `url` an S3 store URL?
pub fn is_s3_url(url: &str) -> bool {
    url.starts_with("s3://")
}

/// Split `s3://BUCKET[/PREFIX]` into bucket and prefix (no slashes at either end).
pub fn parse_s3_url(url: &str) -> std::result::Result<(String, String), RemoteError> {
    let bad = |reason: &str| RemoteError::BadUrl {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| bad("not an s3:// URL"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(bad("no bucket name: use s3://BUCKET/PREFIX"));
    }
    if !bucket
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    {
        return Err(bad(
            "bucket names are lower-case letters, digits, '-' and '.': use s3://BUCKET/PREFIX",
        ));
    }
    let prefix = prefix.trim_matches('/').to_string();
    if prefix.split('/').any(|s| s == "." || s == "..") {
        return Err(bad("the prefix may not contain . or .. components"));
    }
    Ok((bucket.to_string(), prefix))
}

/// A connection to one S3 store (bucket + prefix) and its local cache.
pub struct Remote {
    url: String,
    bucket: String,
    prefix: String,
    endpoint: String,
    s3: Arc<dyn ObjectStore>,
    rt: tokio::runtime::Runtime,
    cache: PathBuf,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("url", &self.url)
            .field("endpoint", &self.endpoint)
            .field("cache", &self.cache)
            .finish()
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|s| !s.is_empty())
}

fn is_loopback_http(endpoint: &str) -> bool {
    let Some(rest) = endpoint.strip_prefix("http://") else {
        return false;
    };
    let host = rest.split('/').next().unwrap_or("");
    let host = if let Some(h) = host.strip_prefix('[') {
        h.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Remote {
    /// Connect to `s3://BUCKET/PREFIX` (no request is made yet), with the
    /// default cache directory (see the module doc).
    pub fn connect(url: &str) -> Result<Remote> {
        Self::connect_with_cache(url, None)
    }

    /// Like [`Remote::connect`], with an explicit cache directory.
    pub fn connect_with_cache(url: &str, cache: Option<PathBuf>) -> Result<Remote> {
        let (bucket, prefix) = parse_s3_url(url)?;
        let endpoint = env("AWS_ENDPOINT_URL").or_else(|| env("AWS_ENDPOINT"));
        let connect_timeout = env("CKPT_S3_CONNECT_TIMEOUT")
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(5);
        // Client options first: with_client_options replaces them all
        // (allow_http included).
        let mut b = AmazonS3Builder::from_env()
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(connect_timeout))
                    .with_timeout(Duration::from_secs(300)),
            )
            .with_bucket_name(&bucket);
        if env("AWS_REGION").is_none() && env("AWS_DEFAULT_REGION").is_none() {
            b = b.with_region("us-east-1");
        }
        let allow_http = env("AWS_ALLOW_HTTP").is_some_and(|v| v == "true" || v == "1");
        if let Some(ep) = &endpoint {
            if ep.starts_with("http://") && !allow_http && !is_loopback_http(ep) {
                return Err(RemoteError::BadUrl {
                    url: url.to_string(),
                    reason: format!(
                        "AWS_ENDPOINT_URL {ep} is plain HTTP on a non-loopback address: use https, or set AWS_ALLOW_HTTP=true"
                    ),
                }
                .into());
            }
            b = b
                .with_endpoint(ep.trim_end_matches('/'))
                .with_virtual_hosted_style_request(false)
                .with_allow_http(ep.starts_with("http://"));
        }
        b = b
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(30),
                backoff: object_store::BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(2),
                    base: 2.0,
                },
            });
        let s3 = b.build().map_err(|e| RemoteError::BadUrl {
            url: url.to_string(),
            reason: format!("cannot configure the S3 client: {e}"),
        })?;
        let endpoint = endpoint.unwrap_or_else(|| "AWS S3".to_string());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::io("start the S3 client's runtime", e))?;
        let cache = cache.unwrap_or_else(|| cache_dir(&bucket, &prefix, &endpoint));
        Ok(Remote {
            url: url.trim_end_matches('/').to_string(),
            bucket,
            prefix,
            endpoint,
            s3: Arc::new(s3),
            rt,
            cache,
        })
    }

    /// The store URL (`s3://BUCKET/PREFIX`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The local cache directory (a normal local store).
    pub fn cache_dir(&self) -> &Path {
        &self.cache
    }

    fn key(&self, rel: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(rel)
        } else {
            ObjPath::from(format!("{}/{rel}", self.prefix))
        }
    }

    /// `s3://BUCKET/PREFIX/rel`, for messages.
    pub fn object_url(&self, rel: &str) -> String {
        format!("{}/{rel}", self.url)
    }

    /// Key of pack `name` relative to the prefix.
    pub fn pack_rel(name: &str) -> String {
        format!("packs/{}/{name}.pack", name.get(..2).unwrap_or("xx"))
    }

    fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Turn an object_store error into a clear [`RemoteError`].
    fn classify(&self, what: &str, rel: &str, e: object_store::Error) -> RemoteError {
        let mut detail = e.to_string();
        let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&e);
        while let Some(s) = src {
            let t = s.to_string();
            if !detail.contains(&t) {
                detail.push_str(": ");
                detail.push_str(&t);
            }
            src = s.source();
        }
        let object = self.object_url(rel);
        let low = detail.to_ascii_lowercase();
        if low.contains("nosuchbucket") || low.contains("specified bucket does not exist") {
            return RemoteError::NoSuchBucket {
                bucket: self.bucket.clone(),
                endpoint: self.endpoint.clone(),
            };
        }
        match &e {
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => {
                return RemoteError::AccessDenied {
                    bucket: self.bucket.clone(),
                    what: what.into(),
                    object,
                    detail,
                };
            }
            object_store::Error::NotFound { .. } => {
                return RemoteError::MissingObject { object };
            }
            _ => {}
        }
        if low.contains("invalidaccesskeyid")
            || low.contains("signaturedoesnotmatch")
            || low.contains("accessdenied")
            || low.contains("403 forbidden")
            || low.contains("expiredtoken")
        {
            return RemoteError::AccessDenied {
                bucket: self.bucket.clone(),
                what: what.into(),
                object,
                detail,
            };
        }
        if low.contains("error sending request")
            || low.contains("connection refused")
            || low.contains("dns error")
            || low.contains("timed out")
            || low.contains("connect")
        {
            return RemoteError::Unreachable {
                endpoint: self.endpoint.clone(),
                what: what.into(),
                object,
                detail,
            };
        }
        RemoteError::Other {
            what: what.into(),
            object,
            detail,
        }
    }

    /// Size and ETag of `rel`, or `None` if it does not exist.
    pub fn head(&self, rel: &str) -> Result<Option<ObjectInfo>> {
        let key = self.key(rel);
        match self.block_on(self.s3.head(&key)) {
            Ok(m) => Ok(Some(ObjectInfo {
                size: m.size,
                etag: m.e_tag,
            })),
            Err(object_store::Error::NotFound { .. }) => {
                // A missing bucket also answers 404 to HEAD: tell them apart.
                self.check_bucket()?;
                Ok(None)
            }
            Err(e) => Err(self.classify("HEAD", rel, e).into()),
        }
    }

    /// Fails with [`RemoteError::NoSuchBucket`] if the bucket is missing.
    fn check_bucket(&self) -> Result<()> {
        let prefix = self.key("");
        let r = self.block_on(async {
            let mut s = self.s3.list(Some(&prefix));
            s.next().await.transpose()
        });
        match r {
            Ok(_) => Ok(()),
            Err(e) => Err(self.classify("LIST", "", e).into()),
        }
    }

    /// Fetch byte ranges of `rel` (coalesced into few requests). Each result
    /// has exactly the length of its range, else the object is reported
    /// truncated.
    pub fn get_ranges(&self, rel: &str, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        let work = [(rel.to_string(), ranges.to_vec())];
        Ok(self.get_ranges_many(&work)?.pop().unwrap_or_default())
    }

    /// Fetch ranges of several objects concurrently: `(rel, ranges)` in,
    /// the bytes of each range out, in the same order. Ranges of one object
    /// less than [`COALESCE_GAP`] apart are fetched in one GET (our own
    /// coalescing: the object may be shorter than its catalog says, and that
    /// must be an error naming it, not a panic).
    pub fn get_ranges_many(
        &self,
        work: &[(String, Vec<Range<u64>>)],
    ) -> Result<Vec<Vec<Bytes>>> {
        self.get_ranges_each(work)
            .into_iter()
            .map(|r| r.map_err(StoreError::from))
            .collect()
    }

    /// Like [`Remote::get_ranges_many`], with one result per object (a
    /// missing or short object does not hide the others: for verify).
    pub fn get_ranges_each(
        &self,
        work: &[(String, Vec<Range<u64>>)],
    ) -> Vec<std::result::Result<Vec<Bytes>, RemoteError>> {
        // (object index, merged range)
        let mut fetches: Vec<(usize, Range<u64>)> = Vec::new();
        for (i, (_, ranges)) in work.iter().enumerate() {
            let mut sorted: Vec<Range<u64>> = ranges.clone();
            sorted.sort_by_key(|r| r.start);
            let mut cur: Option<Range<u64>> = None;
            for r in sorted {
                cur = match cur {
                    Some(c) if r.start <= c.end + COALESCE_GAP => Some(c.start..c.end.max(r.end)),
                    Some(c) => {
                        fetches.push((i, c));
                        Some(r)
                    }
                    None => Some(r),
                };
            }
            if let Some(c) = cur {
                fetches.push((i, c));
            }
        }
        let s3 = &self.s3;
        let results: Vec<(usize, Range<u64>, object_store::Result<Bytes>)> = self.block_on(async {
            futures::stream::iter(fetches)
                .map(|(i, r)| {
                    let key = self.key(&work[i].0);
                    async move {
                        let got = s3.get_range(&key, r.clone()).await;
                        (i, r, got)
                    }
                })
                .buffer_unordered(CONCURRENCY * 2)
                .collect()
                .await
        });
        let mut by_obj: Vec<Vec<(Range<u64>, Bytes)>> = vec![Vec::new(); work.len()];
        let mut failed: Vec<Option<RemoteError>> = (0..work.len()).map(|_| None).collect();
        for (i, r, got) in results {
            let rel = &work[i].0;
            if failed[i].is_some() {
                continue;
            }
            let truncated = |reason: String| RemoteError::CorruptObject {
                object: self.object_url(rel),
                reason,
            };
            let b = match got {
                Ok(b) => b,
                Err(e) => {
                    let t = e.to_string();
                    failed[i] = Some(if t.contains("Wanted range") || t.contains("416") || t.contains("InvalidRange") || t.contains("Range") && t.contains("length") {
                        truncated(format!("truncated: {t}"))
                    } else {
                        self.classify("GET", rel, e)
                    });
                    continue;
                }
            };
            if b.len() as u64 != r.end - r.start {
                failed[i] = Some(truncated(format!(
                    "truncated: bytes {}..{} came back as {} bytes",
                    r.start,
                    r.end,
                    b.len()
                )));
                continue;
            }
            by_obj[i].push((r, b));
        }
        let mut out = Vec::with_capacity(work.len());
        for (i, (_, ranges)) in work.iter().enumerate() {
            if let Some(e) = failed[i].take() {
                out.push(Err(e));
                continue;
            }
            let fetched = &mut by_obj[i];
            fetched.sort_by_key(|(mr, _)| mr.start);
            let mut v = Vec::with_capacity(ranges.len());
            for r in ranges {
                // The last fetched range starting at or before r.start holds it.
                let k = fetched.partition_point(|(mr, _)| mr.start <= r.start);
                let (mr, b) = &fetched[k.checked_sub(1).expect("every range is inside a fetched range")];
                debug_assert!(r.end <= mr.end);
                v.push(b.slice((r.start - mr.start) as usize..(r.end - mr.start) as usize));
            }
            out.push(Ok(v));
        }
        out
    }

    /// Whole objects `rels`, fetched concurrently (one result each).
    pub fn get_many(&self, rels: &[String]) -> Vec<std::result::Result<Bytes, RemoteError>> {
        let s3 = &self.s3;
        let mut got: Vec<(usize, std::result::Result<Bytes, RemoteError>)> = self.block_on(async {
            futures::stream::iter(rels.iter().enumerate())
                .map(|(i, rel)| {
                    let key = self.key(rel);
                    async move {
                        let r = match s3.get(&key).await {
                            Ok(res) => res.bytes().await,
                            Err(e) => Err(e),
                        };
                        (i, r.map_err(|e| self.classify("GET", rel, e)))
                    }
                })
                .buffer_unordered(CONCURRENCY)
                .collect()
                .await
        });
        got.sort_by_key(|g| g.0);
        got.into_iter().map(|g| g.1).collect()
    }

    /// Delete the objects `rels` (concurrently; a missing one is fine).
    pub fn delete_many(&self, rels: &[String]) -> Result<()> {
        let s3 = &self.s3;
        let results: Vec<std::result::Result<(), RemoteError>> = self.block_on(async {
            futures::stream::iter(rels.iter())
                .map(|rel| {
                    let key = self.key(rel);
                    async move {
                        match s3.delete(&key).await {
                            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                            Err(e) => Err(self.classify("DELETE", rel, e)),
                        }
                    }
                })
                .buffer_unordered(CONCURRENCY)
                .collect()
                .await
        });
        results.into_iter().try_for_each(|r| r.map_err(StoreError::from))
    }

    /// Download `rel` into `dest` (created or truncated, fsync'd); calls
    /// `progress` with byte counts as they arrive. Returns the object's
    /// size, ETag and BLAKE3 hex of the bytes.
    pub fn download(
        &self,
        rel: &str,
        dest: &Path,
        progress: &dyn Fn(u64),
    ) -> Result<(ObjectInfo, String)> {
        let key = self.key(rel);
        let mut f = crate::private::create_file(dest).ctx(|| format!("create {}", dest.display()))?;
        let mut hasher = blake3::Hasher::new();
        let r: std::result::Result<ObjectInfo, RemoteError> = self.block_on(async {
            let res = self
                .s3
                .get(&key)
                .await
                .map_err(|e| self.classify("GET", rel, e))?;
            let info = ObjectInfo {
                size: res.meta.size,
                etag: res.meta.e_tag.clone(),
            };
            let mut stream = res.into_stream();
            while let Some(chunk) = stream
                .try_next()
                .await
                .map_err(|e| self.classify("GET", rel, e))?
            {
                hasher.update(&chunk);
                f.write_all(&chunk).map_err(|e| RemoteError::Other {
                    what: "write the download of".into(),
                    object: self.object_url(rel),
                    detail: format!("{}: {e}", dest.display()),
                })?;
                progress(chunk.len() as u64);
            }
            Ok(info)
        });
        let info = match r {
            Ok(i) => i,
            Err(RemoteError::MissingObject { .. }) if rel == CATALOG_OBJECT => {
                self.check_bucket()?;
                return Err(RemoteError::NoSuchStore {
                    url: self.url.clone(),
                    object: self.object_url(rel),
                }
                .into());
            }
            Err(e) => return Err(e.into()),
        };
        f.sync_all().ctx(|| format!("fsync {}", dest.display()))?;
        Ok((info, hasher.finalize().to_hex().to_string()))
    }

    /// Upload file `src` as `rel` (in parts if large); calls `progress` with
    /// byte counts as they are sent. Returns the new object's ETag.
    pub fn upload_file(
        &self,
        rel: &str,
        src: &Path,
        progress: &dyn Fn(u64),
    ) -> Result<Option<String>> {
        let key = self.key(rel);
        let mut f = File::open(src).ctx(|| format!("open {}", src.display()))?;
        let size = f
            .metadata()
            .ctx(|| format!("stat {}", src.display()))?
            .len();
        if size < MULTIPART_THRESHOLD {
            let mut buf = Vec::with_capacity(size as usize);
            f.read_to_end(&mut buf)
                .ctx(|| format!("read {}", src.display()))?;
            let n = buf.len() as u64;
            let r = self
                .block_on(self.s3.put(&key, PutPayload::from(buf)))
                .map_err(|e| self.classify("PUT", rel, e))?;
            progress(n);
            return Ok(r.e_tag);
        }
        let r: std::result::Result<Option<String>, StoreError> = self.block_on(async {
            let upload = self
                .s3
                .put_multipart(&key)
                .await
                .map_err(|e| self.classify("start multipart upload of", rel, e))?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
            let mut buf = vec![0u8; PART_SIZE];
            loop {
                let n = read_full(&mut f, &mut buf)
                    .ctx(|| format!("read {}", src.display()))?;
                if n == 0 {
                    break;
                }
                if let Err(e) = w.wait_for_capacity(4).await {
                    let _ = w.abort().await;
                    return Err(self.classify("upload part of", rel, e).into());
                }
                w.write(&buf[..n]);
                progress(n as u64);
            }
            let r = w
                .finish()
                .await
                .map_err(|e| self.classify("complete multipart upload of", rel, e))?;
            Ok(r.e_tag)
        });
        r
    }

    /// All packs on the remote: name → size.
    pub fn list_packs(&self) -> Result<HashMap<String, u64>> {
        let prefix = self.key("packs");
        let r: object_store::Result<Vec<object_store::ObjectMeta>> =
            self.block_on(self.s3.list(Some(&prefix)).try_collect());
        let metas = r.map_err(|e| self.classify("LIST", "packs/", e))?;
        let mut out = HashMap::new();
        for m in metas {
            let name = m.location.filename().unwrap_or("");
            // Only names ckpt makes; anything else in the listing is
            // never used as a name (nor as a path in the cache).
            match name.strip_suffix(".pack") {
                Some(stem) if crate::private::is_pack_name(stem) => {
                    out.insert(stem.to_string(), m.size);
                }
                _ => tracing::warn!(object = %m.location, "ignoring an object under packs/ that is not named like a ckpt pack"),
            }
        }
        Ok(out)
    }

    /// PUT `data` as `rel` under a condition (`PutMode::Create`: only if
    /// absent; `PutMode::Update`: only if its ETag still matches).
    /// [`CondPut::Refused`] when the server says the condition failed.
    pub(crate) fn put_if(&self, rel: &str, data: Vec<u8>, mode: PutMode) -> Result<CondPut> {
        let key = self.key(rel);
        let opts = PutOptions { mode, ..Default::default() };
        match self.block_on(self.s3.put_opts(&key, PutPayload::from(data), opts)) {
            Ok(r) => match r.e_tag {
                Some(e) => Ok(CondPut::Written(e)),
                None => Err(RemoteError::Other {
                    what: "conditional PUT".into(),
                    object: self.object_url(rel),
                    detail: "the server returned no ETag: it cannot hold ckpt's writer lock (it needs conditional writes: If-None-Match / If-Match)".into(),
                }
                .into()),
            },
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                Ok(CondPut::Refused)
            }
            Err(e) => Err(self.classify("conditional PUT", rel, e).into()),
        }
    }

    /// The bytes, ETag and last-modified time (ms) of the small object
    /// `rel`, or `None` if it does not exist.
    pub(crate) fn get_small(&self, rel: &str) -> Result<Option<(Bytes, String, i64)>> {
        let key = self.key(rel);
        let r: object_store::Result<(Bytes, object_store::ObjectMeta)> = self.block_on(async {
            let res = self.s3.get(&key).await?;
            let meta = res.meta.clone();
            Ok((res.bytes().await?, meta))
        });
        match r {
            Ok((b, m)) => Ok(Some((b, m.e_tag.unwrap_or_default(), m.last_modified.timestamp_millis()))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.classify("GET", rel, e).into()),
        }
    }

    /// Delete `rel` (tests and maintenance).
    pub fn delete(&self, rel: &str) -> Result<()> {
        let key = self.key(rel);
        self.block_on(self.s3.delete(&key))
            .map_err(|e| self.classify("DELETE", rel, e).into())
    }

    /// Put raw bytes as `rel` (tests and small objects).
    pub fn put_bytes(&self, rel: &str, data: Vec<u8>) -> Result<Option<String>> {
        let key = self.key(rel);
        let r = self
            .block_on(self.s3.put(&key, PutPayload::from(data)))
            .map_err(|e| self.classify("PUT", rel, e))?;
        Ok(r.e_tag)
    }

    /// Upload a consistent snapshot of the catalog behind `conn` (its own
    /// file is `catalog`), after `VACUUM INTO` a temporary file in `tmp_dir`.
    /// Returns the remote catalog's new ETag.
    pub fn upload_catalog(
        &self,
        conn: &Connection,
        catalog: &Path,
        tmp_dir: &Path,
    ) -> Result<Option<String>> {
        let snap = crate::catalog::snapshot(conn, catalog, tmp_dir)?;
        let r = self.upload_file(CATALOG_OBJECT, &snap, &|_| {});
        let _ = fs::remove_file(&snap);
        let etag = r?;
        tracing::debug!(object = %self.object_url(CATALOG_OBJECT), ?etag, "catalog uploaded");
        Ok(etag)
    }

    /// Upload the packs `names` (files under the local store `root`) that the
    /// remote lacks (`have`: name → size, as from [`Remote::list_packs`]; a
    /// pack of another size is sent again), up to [`CONCURRENCY`] at a time.
    /// `progress(bytes, pack_done)` is called as data goes out.
    pub fn upload_packs(
        &self,
        root: &Path,
        packs: &[(String, u64)],
        have: &HashMap<String, u64>,
        progress: &(dyn Fn(u64, bool) + Sync),
    ) -> Result<(u64, u64)> {
        let todo: Vec<&(String, u64)> = packs
            .iter()
            .filter(|(n, s)| have.get(n) != Some(s))
            .collect();
        let (mut n, mut bytes) = (0u64, 0u64);
        // Small packs in one request each, concurrently; large ones in parts.
        for batch in todo.chunks(CONCURRENCY) {
            let results: Vec<Result<u64>> = std::thread::scope(|sc| {
                let hs: Vec<_> = batch
                    .iter()
                    .map(|(name, size)| {
                        sc.spawn(move || -> Result<u64> {
                            let path = crate::pack::pack_path(root, name);
                            let actual = fs::metadata(&path)
                                .ctx(|| format!("stat pack file {}", path.display()))?
                                .len();
                            if actual != *size {
                                return Err(StoreError::Corrupt {
                                    pack: path,
                                    hash: crate::Hash::ZERO_CHUNK,
                                    reason: format!(
                                        "it is {actual} bytes, the catalog says {size}; run `ckpt verify`"
                                    ),
                                });
                            }
                            self.upload_file(&Self::pack_rel(name), &path, &|b| progress(b, false))?;
                            progress(0, true);
                            Ok(*size)
                        })
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err(StoreError::Invalid("upload thread panicked".into()))))
                    .collect()
            });
            for r in results {
                bytes += r?;
                n += 1;
            }
        }
        Ok((n, bytes))
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// `$CKPT_S3_CACHE/<bucket>/<hash>` or `$XDG_CACHE_HOME/ckpt/s3/<bucket>/<hash>`
/// (else `~/.cache/...`), the hash over endpoint and prefix.
fn cache_dir(bucket: &str, prefix: &str, endpoint: &str) -> PathBuf {
    let base = if let Some(d) = env("CKPT_S3_CACHE") {
        PathBuf::from(d)
    } else {
        let xdg = env("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(env("HOME").unwrap_or_else(|| "/tmp".into())).join(".cache")
        });
        xdg.join("ckpt").join("s3")
    };
    let h = blake3::hash(format!("{endpoint}\n{prefix}").as_bytes());
    base.join(bucket).join(&h.to_hex()[..16])
}

/// Generation ids and manifests of a catalog file (opened read-only).
pub(crate) fn catalog_generations(path: &Path) -> Result<Vec<(u64, Vec<u8>)>> {
    crate::catalog::generations::manifests(&crate::catalog::open_read_only(path)?, path)
}

/// Packs (name, size) named by a catalog file (opened read-only).
pub(crate) fn catalog_packs(path: &Path) -> Result<Vec<(String, u64)>> {
    crate::catalog::packs::names_sizes(&crate::catalog::open_read_only(path)?, path)
}

/// Refuse to overwrite `dest` generations that `src` does not have.
pub(crate) fn check_not_diverged(
    src: &[(u64, Vec<u8>)],
    src_name: &str,
    dest: &[(u64, Vec<u8>)],
    dest_name: &str,
    fix: &str,
) -> Result<()> {
    let s: HashMap<u64, &Vec<u8>> = src.iter().map(|(i, m)| (*i, m)).collect();
    let extra: Vec<u64> = dest
        .iter()
        .filter(|(i, m)| s.get(i) != Some(&m))
        .map(|(i, _)| *i)
        .collect();
    if extra.is_empty() {
        return Ok(());
    }
    Err(RemoteError::Diverged {
        reason: format!(
            "{dest_name} has generations that {src_name} lacks or holds differently ({}); copying would lose them: {fix}",
            crate::store::describe_ids(&extra)
        ),
    }
    .into())
}

/// What a [`push`] or [`pull`] did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TransferReport {
    /// Packs named by the source catalog.
    pub packs_total: u64,
    /// Packs copied now.
    pub packs_sent: u64,
    /// Their bytes.
    pub bytes_sent: u64,
    /// Packs the destination already had.
    pub packs_skipped: u64,
    /// Their bytes.
    pub bytes_skipped: u64,
    /// Size of the catalog copied last.
    pub catalog_bytes: u64,
    /// Generations in the copied catalog.
    pub generations: u64,
}

/// Progress of a [`push`] or [`pull`].
pub trait TransferProgress: Sync {
    /// The transfer of `packs` packs, `bytes` bytes in all, begins.
    fn start(&self, packs: u64, bytes: u64);
    /// `bytes` more bytes went through.
    fn bytes(&self, bytes: u64);
    /// One more pack is complete.
    fn pack_done(&self);
}

/// A [`TransferProgress`] that reports nothing.
pub struct NoProgress;

impl TransferProgress for NoProgress {
    fn start(&self, _: u64, _: u64) {}
    fn bytes(&self, _: u64) {}
    fn pack_done(&self) {}
}

/// Copy the local store `src` to `dest_url` (`s3://…`): the packs the remote
/// lacks (by name and size), then a snapshot of the catalog. Refuses if the
/// remote has generations `src` lacks. Safe to re-run after an interruption:
/// packs already there are skipped. Holds the cache lock of the remote store
/// (one writer per host) and its S3 writer lock ([`crate::remote_lock`]).
pub fn push(src: &crate::Store, dest_url: &str, progress: &dyn TransferProgress) -> Result<TransferReport> {
    if src.remote().is_some() {
        return Err(StoreError::Invalid(format!(
            "push copies a local store to S3; {} is itself on S3",
            src.url()
        )));
    }
    let remote = Arc::new(Remote::connect(dest_url)?);
    crate::private::create_dir_all(remote.cache_dir())
        .ctx(|| format!("create cache directory {}", remote.cache_dir().display()))?;
    let _lock = crate::lock_dir(remote.cache_dir())?;
    let s3_lock = RemoteLock::acquire(&remote)?;
    let tmp = src.root().join("tmp");
    crate::private::create_dir_all(&tmp).ctx(|| format!("create {}", tmp.display()))?;
    // A consistent view of the source: its catalog snapshot decides what goes.
    let snap = src.snapshot_catalog(&tmp)?;
    let _rm = RemoveOnDrop(snap.clone());
    let src_gens = catalog_generations(&snap)?;
    if let Some(_info) = remote.head(CATALOG_OBJECT)? {
        let theirs = tmp.join(format!("remote-catalog-{}.db", std::process::id()));
        let _rm2 = RemoveOnDrop(theirs.clone());
        remote.download(CATALOG_OBJECT, &theirs, &|_| {})?;
        let dest_gens = catalog_generations(&theirs)?;
        check_not_diverged(
            &src_gens,
            &src.url(),
            &dest_gens,
            dest_url,
            "pull them first, or push to another prefix",
        )?;
    }
    let packs = catalog_packs(&snap)?;
    let have = remote.list_packs()?;
    let mut rep = TransferReport {
        packs_total: packs.len() as u64,
        generations: src_gens.len() as u64,
        ..Default::default()
    };
    let todo_bytes: u64 = packs
        .iter()
        .filter(|(n, s)| have.get(n) != Some(s))
        .map(|(_, s)| *s)
        .sum();
    let todo_n = packs.iter().filter(|(n, s)| have.get(n) != Some(s)).count() as u64;
    rep.packs_skipped = rep.packs_total - todo_n;
    rep.bytes_skipped = packs.iter().map(|(_, s)| *s).sum::<u64>() - todo_bytes;
    progress.start(todo_n, todo_bytes);
    let (n, b) = remote.upload_packs(src.root(), &packs, &have, &|bytes, done| {
        if bytes > 0 {
            progress.bytes(bytes);
        }
        if done {
            progress.pack_done();
        }
    })?;
    rep.packs_sent = n;
    rep.bytes_sent = b;
    rep.catalog_bytes = fs::metadata(&snap).map(|m| m.len()).unwrap_or(0);
    s3_lock.fence()?;
    remote.upload_file(CATALOG_OBJECT, &snap, &|_| {})?;
    drop(s3_lock);
    tracing::info!(dest = dest_url, packs = n, bytes = b, skipped = rep.packs_skipped, "push complete");
    Ok(rep)
}

/// Copy the S3 store `src_url` into the local store `dest_url` (created if
/// need be): the packs it lacks, each verified (size and BLAKE3 = its
/// name) before it is renamed into place, then the catalog. Refuses if the
/// destination has generations the source lacks. Safe to re-run after an
/// interruption. Takes the destination's writer lock.
pub fn pull(src_url: &str, dest_url: &str, progress: &dyn TransferProgress) -> Result<TransferReport> {
    if is_s3_url(dest_url) {
        return Err(StoreError::Invalid(format!(
            "pull copies an S3 store into a local directory; {dest_url} is on S3"
        )));
    }
    let remote = Remote::connect(src_url)?;
    let dest = crate::Store::open_or_create(dest_url, crate::DEFAULT_CHUNK_SIZE)?;
    let writer = dest.writer()?;
    let tmp = dest.root().join("tmp");
    let cat = tmp.join(format!("pulled-catalog-{}.db", std::process::id()));
    let _rm = RemoveOnDrop(cat.clone());
    remote.download(CATALOG_OBJECT, &cat, &|_| {})?;
    crate::catalog::header_version(&cat)?;
    let src_gens = catalog_generations(&cat)?;
    let dest_gens: Vec<(u64, Vec<u8>)> = dest
        .generations()?
        .into_iter()
        .map(|g| (g.id, g.manifest.0.to_vec()))
        .collect();
    check_not_diverged(
        &src_gens,
        src_url,
        &dest_gens,
        &dest.url(),
        "push them first, or pull into another directory",
    )?;
    let packs = catalog_packs(&cat)?;
    let todo: Vec<&(String, u64)> = packs
        .iter()
        .filter(|(n, s)| {
            fs::metadata(dest.pack_path(n)).map(|m| m.len()) .ok() != Some(*s)
        })
        .collect();
    let todo_bytes: u64 = todo.iter().map(|(_, s)| *s).sum();
    let mut rep = TransferReport {
        packs_total: packs.len() as u64,
        packs_skipped: (packs.len() - todo.len()) as u64,
        bytes_skipped: packs.iter().map(|(_, s)| *s).sum::<u64>() - todo_bytes,
        generations: src_gens.len() as u64,
        ..Default::default()
    };
    progress.start(todo.len() as u64, todo_bytes);
    for batch in todo.chunks(CONCURRENCY) {
        let results: Vec<Result<u64>> = std::thread::scope(|sc| {
            let hs: Vec<_> = batch
                .iter()
                .map(|(name, size)| {
                    let remote = &remote;
                    let dest = &dest;
                    let tmp = &tmp;
                    sc.spawn(move || -> Result<u64> {
                        let rel = Remote::pack_rel(name);
                        let part = tmp.join(format!("{name}.pull"));
                        let _rm = RemoveOnDrop(part.clone());
                        let (info, hash) = remote.download(&rel, &part, &|b| progress.bytes(b))?;
                        if info.size != *size || hash != *name {
                            return Err(RemoteError::CorruptObject {
                                object: remote.object_url(&rel),
                                reason: if info.size != *size {
                                    format!("it is {} bytes, the catalog says {size}", info.size)
                                } else {
                                    format!("its bytes hash to {hash}, not to its name")
                                },
                            }
                            .into());
                        }
                        let final_path = dest.pack_path(name);
                        let dir = final_path.parent().expect("pack dir");
                        crate::private::create_dir_all(dir).ctx(|| format!("create {}", dir.display()))?;
                        fs::rename(&part, &final_path)
                            .ctx(|| format!("rename {} into place", final_path.display()))?;
                        crate::pack::sync_dir(dir).ctx(|| format!("fsync {}", dir.display()))?;
                        progress.pack_done();
                        Ok(*size)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(StoreError::Invalid("download thread panicked".into()))))
                .collect()
        });
        for r in results {
            rep.bytes_sent += r?;
            rep.packs_sent += 1;
        }
    }
    rep.catalog_bytes = fs::metadata(&cat).map(|m| m.len()).unwrap_or(0);
    writer.replace_catalog(&cat)?;
    tracing::info!(src = src_url, packs = rep.packs_sent, bytes = rep.bytes_sent, "pull complete");
    Ok(rep)
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

// ------------------------------------------------------------ cache state

fn synced_etag_path(cache: &Path) -> PathBuf {
    cache.join("synced-etag")
}

fn unsynced_path(cache: &Path) -> PathBuf {
    cache.join("unsynced")
}

/// Whether the cache holds commits the remote lacks.
pub(crate) fn is_unsynced(cache: &Path) -> bool {
    unsynced_path(cache).exists()
}

/// Mark the cache as ahead of the remote (before a local commit).
pub(crate) fn mark_unsynced(cache: &Path) -> Result<()> {
    let p = unsynced_path(cache);
    crate::private::write_file(&p, b"local commits not yet uploaded\n").ctx(|| format!("write {}", p.display()))
}

/// Forget that the cache holds unsynced commits (they are being discarded).
pub(crate) fn clear_unsynced(cache: &Path) -> Result<()> {
    let u = unsynced_path(cache);
    match fs::remove_file(&u) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError::io(format!("remove {}", u.display()), e)),
        _ => Ok(()),
    }
}

/// Record that the local catalog equals the remote one with `etag`.
pub(crate) fn mark_synced(cache: &Path, etag: Option<&str>) -> Result<()> {
    let p = synced_etag_path(cache);
    crate::private::write_file(&p, etag.unwrap_or("").as_bytes()).ctx(|| format!("write {}", p.display()))?;
    let u = unsynced_path(cache);
    if u.exists() {
        fs::remove_file(&u).ctx(|| format!("remove {}", u.display()))?;
    }
    Ok(())
}

fn synced_etag(cache: &Path) -> Option<String> {
    fs::read_to_string(synced_etag_path(cache))
        .ok()
        .filter(|s| !s.is_empty())
}

/// What [`Remote::prepare_cache`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CacheState {
    /// The cache catalog is current (or newer: unsynced local commits).
    Current,
    /// The remote has no store yet.
    NoRemoteStore,
}

impl Remote {
    /// Make the cache's catalog file match the remote catalog, downloading
    /// it if its ETag changed. Call with the cache lock held and no
    /// connection open on the cache catalog. A cache with unsynced commits
    /// is left alone (it is newer).
    pub(crate) fn prepare_cache(&self) -> Result<CacheState> {
        let cache = &self.cache;
        let catalog = cache.join("catalog.db");
        if is_unsynced(cache) && catalog.exists() {
            tracing::warn!(store = %self.url, cache = %cache.display(), "the local cache holds commits not yet uploaded; they go up with the next commit or `ckpt push`");
            return Ok(CacheState::Current);
        }
        let Some(info) = self.head(CATALOG_OBJECT)? else {
            return Ok(CacheState::NoRemoteStore);
        };
        if catalog.exists() && info.etag.is_some() && synced_etag(cache) == info.etag {
            return Ok(CacheState::Current);
        }
        let tmp = cache.join("tmp");
        crate::private::create_dir_all(&tmp).ctx(|| format!("create {}", tmp.display()))?;
        let dl = tmp.join(format!("catalog-download-{}.db", std::process::id()));
        let _rm = RemoveOnDrop(dl.clone());
        let (info, _) = self.download(CATALOG_OBJECT, &dl, &|_| {})?;
        crate::catalog::header_version(&dl)?;
        install_catalog(&dl, &catalog)?;
        mark_synced(cache, info.etag.as_deref())?;
        tracing::debug!(store = %self.url, size = info.size, "catalog downloaded");
        Ok(CacheState::Current)
    }

    /// Upload every pack of the cache's catalog that the remote lacks;
    /// returns (packs, bytes) sent.
    pub(crate) fn upload_missing_packs(&self, conn: &Connection, catalog: &Path) -> Result<(u64, u64)> {
        let packs = crate::catalog::packs::names_sizes(conn, catalog)?;
        let have = self.list_packs()?;
        self.upload_packs(&self.cache, &packs, &have, &|_, _| {})
    }

    /// Upload the catalog behind `conn` (after checking that `lock` is
    /// still ours) and clear the unsynced marker.
    pub(crate) fn publish_catalog(&self, conn: &Connection, catalog: &Path, lock: &RemoteLock) -> Result<()> {
        lock.fence()?;
        let etag = self.upload_catalog(conn, catalog, &self.cache.join("tmp"))?;
        mark_synced(&self.cache, etag.as_deref())
    }

    /// Upload every pack of the cache the remote lacks, then the catalog
    /// behind `conn`; clears the unsynced marker.
    pub(crate) fn sync_up(&self, conn: &Connection, catalog: &Path, lock: &RemoteLock) -> Result<()> {
        self.upload_missing_packs(conn, catalog)?;
        self.publish_catalog(conn, catalog, lock)
    }

    /// A new store: upload the (empty) catalog behind `conn` only if no
    /// catalog exists yet (`If-None-Match: *`). Returns false, changing
    /// nothing, if another writer created the store meanwhile.
    pub(crate) fn create_catalog(&self, conn: &Connection, catalog: &Path) -> Result<bool> {
        let snap = crate::catalog::snapshot(conn, catalog, &self.cache.join("tmp"))?;
        let _rm = RemoveOnDrop(snap.clone());
        let bytes = fs::read(&snap).ctx(|| format!("read {}", snap.display()))?;
        match self.put_if(CATALOG_OBJECT, bytes, PutMode::Create)? {
            CondPut::Written(etag) => {
                mark_synced(&self.cache, Some(&etag))?;
                Ok(true)
            }
            CondPut::Refused => Ok(false),
        }
    }

    /// After a local commit that wrote `new_packs`: upload them, then the
    /// catalog; clears the unsynced marker.
    pub(crate) fn upload_commit(
        &self,
        new_packs: &[(String, u64)],
        conn: &Connection,
        catalog: &Path,
        lock: &RemoteLock,
    ) -> Result<()> {
        self.upload_packs(&self.cache, new_packs, &HashMap::new(), &|_, _| {})?;
        self.publish_catalog(conn, catalog, lock)
    }

    /// Whether the remote catalog is not the one the cache last synced with
    /// (another writer uploaded since). False if there is no remote catalog.
    pub(crate) fn moved_since_sync(&self) -> Result<bool> {
        Ok(match self.head(CATALOG_OBJECT)? {
            Some(i) => i.etag.is_none() || i.etag != synced_etag(&self.cache),
            None => false,
        })
    }

    /// Whether the remote catalog changed since the cache last matched it.
    pub(crate) fn remote_changed(&self) -> Result<bool> {
        if is_unsynced(&self.cache) {
            return Ok(false);
        }
        let info = self.head(CATALOG_OBJECT)?;
        Ok(match info {
            Some(i) => i.etag.is_none() || i.etag != synced_etag(&self.cache),
            None => false,
        })
    }
}

/// Replace `catalog` (no connection may be open on it) with the file
/// `new`: drop the old WAL and shared-memory files, rename, fsync.
pub(crate) fn install_catalog(new: &Path, catalog: &Path) -> Result<()> {
    for ext in ["db-wal", "db-shm"] {
        let p = catalog.with_extension(ext);
        if p.exists() {
            fs::remove_file(&p).ctx(|| format!("remove {}", p.display()))?;
        }
    }
    fs::rename(new, catalog).ctx(|| format!("rename {} to {}", new.display(), catalog.display()))?;
    if let Some(d) = catalog.parent() {
        crate::pack::sync_dir(d).ctx(|| format!("fsync {}", d.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(parse_s3_url("s3://b/p/q/").unwrap(), ("b".into(), "p/q".into()));
        assert_eq!(parse_s3_url("s3://b").unwrap(), ("b".into(), "".into()));
        assert!(parse_s3_url("s3:///p").is_err());
        assert!(parse_s3_url("s3://B/p").is_err());
        assert!(parse_s3_url("s3://b/../x").is_err());
    }

    #[test]
    fn loopback() {
        assert!(is_loopback_http("http://127.0.0.1:9000"));
        assert!(is_loopback_http("http://localhost:9000/"));
        assert!(is_loopback_http("http://[::1]:9000"));
        assert!(!is_loopback_http("http://10.0.0.1:9000"));
        assert!(!is_loopback_http("https://127.0.0.1"));
    }
}
