//! Link the restorer as a freestanding static executable at the start of the
//! restorer zone (`wire::restore::ZONE_START`).
//!
//! Only bins get these arguments, so the integration tests (normal std
//! programs) link as usual.

fn main() {
    // Keep in sync with `ckpt_wire::restore::ZONE_START` (checked at compile
    // time in `src/main.rs`).
    const IMAGE_BASE: &str = "0x200000000000";
    for arg in ["-nostartfiles", "-nostdlib", "-static"] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-Wl,--image-base={IMAGE_BASE}");
    println!("cargo:rerun-if-changed=build.rs");
}
