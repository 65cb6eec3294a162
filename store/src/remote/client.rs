//! The S3 client of a store: one bucket and prefix behind a blocking API
//! (the async object_store client on a private current-thread tokio
//! runtime), its requests (HEAD, ranged and whole GETs, PUTs plain,
//! conditional and multipart, LIST, DELETE) and the classification of their
//! failures into [`RemoteError`]s that name the object and the fix.
//!
//! This module must never interpret what it moves (packs and catalogs are
//! bytes to it), and must never hand back a range shorter than asked for:
//! a short object is an error naming it.

use std::collections::HashMap;
use std::fs::File;
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

use crate::error::{IoCtx, RemoteError, Result, StoreError};

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
