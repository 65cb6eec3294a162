//! rseq_vdso: glibc's rseq registration (cpu_id kept up to date while
//! threads migrate between CPUs) and [vdso]/[vvar]/[vvar_vclock] at their
//! original addresses with working clocks, after restart and re-restart.
mod common;
use common::*;

#[test]
fn rseq_vdso_checkpoint_restart_cycle() {
    let c = Cycle::new(program("rseq_vdso"), &["-t", "100"]);
    standard_cycle("rseq_vdso", &c);
}
