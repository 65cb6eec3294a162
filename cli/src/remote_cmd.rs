//! `ckpt push DEST` and `ckpt pull SRC`: copy a store to S3 and back
//! (the work is `ckpt_store::remote::{push, pull}`), with a progress bar
//! on a terminal.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Result, bail};
use ckpt_store::Store;
use ckpt_store::remote::{self, TransferProgress, TransferReport};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Progress on stderr: a bar when stderr is a terminal, nothing otherwise.
struct Bar {
    bar: ProgressBar,
    verb: &'static str,
    packs: AtomicU64,
    done: AtomicU64,
}

impl Bar {
    fn new(verb: &'static str) -> Bar {
        let bar = ProgressBar::hidden();
        if std::io::stderr().is_terminal() {
            bar.set_draw_target(ProgressDrawTarget::stderr());
        }
        Bar { bar, verb, packs: AtomicU64::new(0), done: AtomicU64::new(0) }
    }
}

impl TransferProgress for Bar {
    fn start(&self, packs: u64, bytes: u64) {
        self.packs.store(packs, Ordering::Relaxed);
        self.bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        self.bar.set_prefix(self.verb);
        self.bar.set_length(bytes);
        self.bar.set_position(0);
        self.bar.set_message(format!("0/{packs} packs"));
    }

    fn bytes(&self, bytes: u64) {
        self.bar.inc(bytes);
    }

    fn pack_done(&self) {
        let d = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        self.bar.set_message(format!("{d}/{} packs", self.packs.load(Ordering::Relaxed)));
    }
}

fn report(verb: &str, what: &str, r: &TransferReport, secs: f64) {
    let mb = r.bytes_sent as f64 / 1e6;
    eprintln!(
        "{verb} {what}: {} of {} packs ({:.1} MB) in {:.2}s ({:.1} MB/s); {} packs ({:.1} MB) already there; catalog {:.1} KB, {} generations",
        r.packs_sent,
        r.packs_total,
        mb,
        secs,
        if secs > 0.0 { mb / secs } else { 0.0 },
        r.packs_skipped,
        r.bytes_skipped as f64 / 1e6,
        r.catalog_bytes as f64 / 1e3,
        r.generations
    );
}

/// `ckpt push DEST --store SRC`: SRC is a local store, DEST `s3://…`.
pub fn push(src_url: &str, dest: &str, as_json: bool) -> Result<ExitCode> {
    if !remote::is_s3_url(dest) {
        bail!("push sends a local store to S3: DEST must be s3://BUCKET/PREFIX, not {dest:?}");
    }
    if remote::is_s3_url(src_url) {
        bail!("push sends a local store to S3: --store must be a local store, not {src_url}");
    }
    let src = Store::open(src_url)?;
    transfer("push", "pushed", &format!("{src_url} to {dest}"), as_json, |bar| remote::push(&src, dest, bar))
}

/// `ckpt pull SRC --store DEST`: SRC is `s3://…`, DEST a local store.
pub fn pull(src: &str, dest_url: &str, as_json: bool) -> Result<ExitCode> {
    if !remote::is_s3_url(src) {
        bail!("pull fetches a store from S3: SRC must be s3://BUCKET/PREFIX, not {src:?}");
    }
    if remote::is_s3_url(dest_url) {
        bail!("pull fetches a store from S3 into a local directory: --store must be local, not {dest_url}");
    }
    transfer("pull", "pulled", &format!("{src} into {dest_url}"), as_json, |bar| remote::pull(src, dest_url, bar))
}

/// Runs one transfer with a progress bar, then reports it (text or JSON).
fn transfer(
    verb: &'static str,
    done: &str,
    what: &str,
    as_json: bool,
    run: impl FnOnce(&Bar) -> ckpt_store::Result<TransferReport>,
) -> Result<ExitCode> {
    let t0 = Instant::now();
    let bar = Bar::new(verb);
    let r = run(&bar);
    bar.bar.finish_and_clear();
    let r = r?;
    let secs = t0.elapsed().as_secs_f64();
    if as_json {
        println!("{}", serde_json::json!({"report": r, "seconds": secs}));
    } else {
        report(done, what, &r, secs);
    }
    Ok(ExitCode::SUCCESS)
}
