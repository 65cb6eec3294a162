//! `bench-compare PREVIOUS NOW`: the headline figures of a run (JSON lines
//! that the benchmarks append to `$CKPT_BENCH_FIGURES`, see
//! [`ckpt_benches::figure`]) as one Markdown table: each figure with its
//! ceiling from the same run, its target, and its ratio to the same
//! figure of the previous run (`benches/baseline.jsonl`, the run
//! BENCHMARKS.md shows). A figure the previous run lacks says so. Lower
//! is better for every figure.

use std::collections::HashMap;

use serde_json::Value;

fn load(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
        eprintln!("bench-compare: cannot read {path}: {e}");
        std::process::exit(2)
    });
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| {
                eprintln!("bench-compare: {path}: not a figure line ({e}): {l}");
                std::process::exit(2)
            })
        })
        .collect()
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [previous, now] = args.as_slice() else {
        eprintln!("usage: bench-compare PREVIOUS.jsonl NOW.jsonl");
        std::process::exit(2)
    };
    let before: HashMap<String, f64> =
        if std::path::Path::new(previous).exists() { load(previous).iter().filter_map(|f| Some((f["name"].as_str()?.to_string(), num(f, "value")?))).collect() } else { HashMap::new() };
    println!("| figure | now | vs ceiling of the same run | target | previous run | now / previous |");
    println!("|---|---|---|---|---|---|");
    for f in load(now) {
        let (Some(name), Some(value)) = (f["name"].as_str(), num(&f, "value")) else { continue };
        let unit = f["unit"].as_str().unwrap_or("");
        let show = |v: f64| if v >= 100.0 { format!("{v:.0} {unit}") } else { format!("{v:.3} {unit}") };
        let ceiling = num(&f, "ceiling").map(|c| format!("{:.2}× ({})", value / c, show(c))).unwrap_or_else(|| "—".into());
        let target = num(&f, "target").map(|t| format!("{}{}", show(t), if value <= t { " (met)" } else { "" })).unwrap_or_else(|| "—".into());
        let (prev, ratio) = match before.get(name) {
            Some(&p) => (show(p), format!("{:.2}×", value / p)),
            None => ("not measured".into(), "—".into()),
        };
        println!("| {name} | {} | {ceiling} | {target} | {prev} | {ratio} |", show(value));
    }
}
