//! Retention policies in the style of restic's `forget`.
//!
//! A generation is kept if any rule keeps it; the newest generation is
//! always kept (a running computation's next incremental checkpoint may
//! reuse its chunks). Time buckets are in UTC: an hour, a day, a week
//! starting on Monday. `--keep-daily 7` keeps the newest generation of each
//! of the 7 most recent days that have a generation (not "the last 7
//! calendar days").

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Serialize;

use crate::error::{GcError, Result};

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

/// What to keep. The default keeps nothing and is refused by
/// [`Policy::check`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Keep the N newest generations.
    pub keep_last: Option<u32>,
    /// Keep every generation created within this long before now.
    pub keep_within: Option<Duration>,
    /// Keep the newest generation of each of the N most recent hours.
    pub keep_hourly: Option<u32>,
    /// ... days (UTC).
    pub keep_daily: Option<u32>,
    /// ... weeks (UTC, starting on Monday).
    pub keep_weekly: Option<u32>,
    /// Keep these generations.
    pub keep: Vec<u64>,
}

/// One generation as the policy sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenTime {
    /// Generation id.
    pub id: u64,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: i64,
}

/// The outcome of a policy: each kept generation with the rules that keep it,
/// and the generations that go.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Kept generations and why ("last", "within", "hourly", "daily",
    /// "weekly", "keep", "latest").
    pub keep: BTreeMap<u64, Vec<&'static str>>,
    /// Generations that go, ascending.
    pub forget: Vec<u64>,
}

impl Policy {
    /// True if no rule is set.
    pub fn is_empty(&self) -> bool {
        self.keep_last.is_none()
            && self.keep_within.is_none()
            && self.keep_hourly.is_none()
            && self.keep_daily.is_none()
            && self.keep_weekly.is_none()
            && self.keep.is_empty()
    }

    /// Refuse an empty policy.
    pub fn check(&self) -> Result<()> {
        if self.is_empty() { Err(GcError::NoPolicy) } else { Ok(()) }
    }

    /// Decide which of `gens` stay, at time `now_ms`. Order of `gens` does
    /// not matter.
    pub fn apply(&self, gens: &[GenTime], now_ms: i64) -> Result<Decision> {
        self.check()?;
        let mut sorted = gens.to_vec();
        // Newest first; ids break ties (ids are ascending in time).
        sorted.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then(b.id.cmp(&a.id)));
        let mut keep: BTreeMap<u64, Vec<&'static str>> = BTreeMap::new();
        let mut add = |id: u64, why: &'static str| keep.entry(id).or_default().push(why);
        if let Some(latest) = gens.iter().map(|g| g.id).max() {
            add(latest, "latest");
        }
        if let Some(n) = self.keep_last {
            for g in sorted.iter().take(n as usize) {
                add(g.id, "last");
            }
        }
        if let Some(d) = self.keep_within {
            let since = now_ms.saturating_sub(d.as_millis().min(i64::MAX as u128) as i64);
            for g in sorted.iter().filter(|g| g.created_ms >= since) {
                add(g.id, "within");
            }
        }
        type Rule = (Option<u32>, fn(i64) -> i64, &'static str);
        let rules: [Rule; 3] = [
            (self.keep_hourly, hour_bucket, "hourly"),
            (self.keep_daily, day_bucket, "daily"),
            (self.keep_weekly, week_bucket, "weekly"),
        ];
        for (n, bucket, why) in rules {
            let Some(n) = n else { continue };
            let mut seen = BTreeSet::new();
            for g in &sorted {
                if seen.len() >= n as usize {
                    break;
                }
                if seen.insert(bucket(g.created_ms)) {
                    add(g.id, why);
                }
            }
        }
        let ids: BTreeSet<u64> = gens.iter().map(|g| g.id).collect();
        for id in &self.keep {
            if !ids.contains(id) {
                return Err(GcError::NoSuchGeneration { id: *id, existing: describe(&ids) });
            }
            add(*id, "keep");
        }
        let forget = ids.iter().copied().filter(|id| !keep.contains_key(id)).collect();
        Ok(Decision { keep, forget })
    }
}

/// Hours since the epoch.
pub fn hour_bucket(ms: i64) -> i64 {
    ms.div_euclid(HOUR_MS)
}

/// Days since the epoch (UTC).
pub fn day_bucket(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS)
}

/// Weeks since the epoch, starting on Monday (1970-01-01 was a Thursday).
pub fn week_bucket(ms: i64) -> i64 {
    (day_bucket(ms) + 3).div_euclid(7)
}

/// Parse a duration such as `30s`, `30m`, `2h`, `7d`, `2w`, `1y` or
/// combinations (`1d12h`). A bare number is refused (ambiguous unit).
pub fn parse_duration(s: &str) -> Result<Duration> {
    let bad = || GcError::BadDuration { given: s.to_string() };
    let t = s.trim();
    if t.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    let mut num = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit: u64 = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            'y' => 365 * 86_400,
            _ => return Err(bad()),
        };
        let n: u64 = num.parse().map_err(|_| bad())?;
        total = n.checked_mul(unit).and_then(|x| total.checked_add(x)).ok_or_else(bad)?;
        num.clear();
    }
    if !num.is_empty() {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

/// Sorted ids as runs: "1-3, 5" ("none" when empty).
pub fn id_ranges(ids: impl IntoIterator<Item = u64>) -> String {
    let v: Vec<u64> = ids.into_iter().collect();
    if v.is_empty() {
        return "none".into();
    }
    let mut parts = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        parts.push(if i == j { v[i].to_string() } else { format!("{}-{}", v[i], v[j]) });
        i = j + 1;
    }
    parts.join(", ")
}

/// "generations 1-3, 5".
pub(crate) fn describe(ids: &BTreeSet<u64>) -> String {
    if ids.is_empty() {
        return "no generations".into();
    }
    format!("generations {}", id_ranges(ids.iter().copied()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(id: u64, created_ms: i64) -> GenTime {
        GenTime { id, created_ms }
    }

    /// 2026-11-24 00:00:00 UTC (a Tuesday).
    const T0: i64 = 1_795_478_400_000;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(7 * 86400));
        assert_eq!(parse_duration("2w").unwrap(), Duration::from_secs(14 * 86400));
        assert_eq!(parse_duration("1d12h").unwrap(), Duration::from_secs(86400 + 12 * 3600));
        assert_eq!(parse_duration("45s").unwrap(), Duration::from_secs(45));
        for bad in ["", "30", "h", "3x", "1.5h", "-1h", "99999999999999999999y"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.to_string().contains("30m"), "{bad}: {e}");
        }
    }

    #[test]
    fn empty_policy_refused() {
        let e = Policy::default().apply(&[g(1, T0)], T0).unwrap_err();
        assert!(matches!(e, GcError::NoPolicy));
        assert!(e.to_string().contains("--keep-last"), "{e}");
    }

    #[test]
    fn keep_last_and_latest() {
        let gens: Vec<GenTime> = (1..=10).map(|i| g(i, T0 + i as i64 * 1000)).collect();
        let p = Policy { keep_last: Some(3), ..Default::default() };
        let d = p.apply(&gens, T0 + 20_000).unwrap();
        assert_eq!(d.keep.keys().copied().collect::<Vec<_>>(), vec![8, 9, 10]);
        assert_eq!(d.forget, (1..=7).collect::<Vec<_>>());
        assert_eq!(d.keep[&10], vec!["latest", "last"]);
        // keep-last 0 still keeps the newest one.
        let p = Policy { keep_last: Some(0), ..Default::default() };
        let d = p.apply(&gens, T0).unwrap();
        assert_eq!(d.keep.keys().copied().collect::<Vec<_>>(), vec![10]);
    }

    #[test]
    fn keep_explicit_and_unknown() {
        let gens: Vec<GenTime> = (1..=5).map(|i| g(i, T0 + i as i64)).collect();
        let p = Policy { keep: vec![2], ..Default::default() };
        let d = p.apply(&gens, T0).unwrap();
        assert_eq!(d.keep.keys().copied().collect::<Vec<_>>(), vec![2, 5]);
        let p = Policy { keep: vec![9], ..Default::default() };
        let e = p.apply(&gens, T0).unwrap_err().to_string();
        assert!(e.contains("generation 9") && e.contains("1-5"), "{e}");
    }

    #[test]
    fn keep_within() {
        let gens = [g(1, T0), g(2, T0 + 50 * 60_000), g(3, T0 + 100 * 60_000), g(4, T0 + 119 * 60_000)];
        let p = Policy { keep_within: Some(parse_duration("30m").unwrap()), ..Default::default() };
        let d = p.apply(&gens, T0 + 120 * 60_000).unwrap();
        assert_eq!(d.keep.keys().copied().collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(d.forget, vec![1, 2]);
    }

    #[test]
    fn hourly_buckets_keep_newest_per_hour() {
        // Three generations in each of 5 hours.
        let mut gens = Vec::new();
        let mut id = 0;
        for h in 0..5 {
            for m in [5, 30, 55] {
                id += 1;
                gens.push(g(id, T0 + h * HOUR_MS + m * 60_000));
            }
        }
        let p = Policy { keep_hourly: Some(3), ..Default::default() };
        let d = p.apply(&gens, T0 + 6 * HOUR_MS).unwrap();
        // The newest of hours 4, 3, 2: ids 15, 12, 9.
        assert_eq!(d.keep.keys().copied().collect::<Vec<_>>(), vec![9, 12, 15]);
        // More buckets than exist: one per hour.
        let p = Policy { keep_hourly: Some(100), ..Default::default() };
        let d = p.apply(&gens, T0).unwrap();
        assert_eq!(d.keep.keys().copied().collect::<Vec<_>>(), vec![3, 6, 9, 12, 15]);
    }

    #[test]
    fn daily_and_weekly_buckets() {
        // T0 is Tuesday 2026-11-24. Days: Sun 22, Mon 23, Tue 24 (two), and
        // the Monday a week before.
        let gens = [
            g(1, T0 - 8 * DAY_MS + HOUR_MS), // Mon 16th
            g(2, T0 - 2 * DAY_MS + 1000),     // Sun 22nd
            g(3, T0 - DAY_MS + 1000),         // Mon 23rd
            g(4, T0 + 1000),                  // Tue 24th
            g(5, T0 + 2000),                  // Tue 24th
        ];
        let p = Policy { keep_daily: Some(2), ..Default::default() };
        let d = p.apply(&gens, T0 + DAY_MS).unwrap();
        assert_eq!(d.keep.keys().copied().collect::<Vec<_>>(), vec![3, 5]);
        // Weeks start on Monday: {3,4,5} is one week, {1,2} the one before.
        assert_eq!(week_bucket(gens[1].created_ms), week_bucket(gens[0].created_ms));
        assert_eq!(week_bucket(gens[2].created_ms), week_bucket(gens[4].created_ms));
        assert_ne!(week_bucket(gens[1].created_ms), week_bucket(gens[2].created_ms));
        let p = Policy { keep_weekly: Some(2), ..Default::default() };
        let d = p.apply(&gens, T0).unwrap();
        assert_eq!(d.keep.keys().copied().collect::<Vec<_>>(), vec![2, 5]);
    }

    #[test]
    fn rules_combine_as_union() {
        let gens: Vec<GenTime> = (1..=6).map(|i| g(i, T0 + i as i64 * HOUR_MS)).collect();
        let p = Policy { keep_last: Some(1), keep: vec![1], keep_hourly: Some(2), ..Default::default() };
        let d = p.apply(&gens, T0).unwrap();
        assert_eq!(d.keep.keys().copied().collect::<Vec<_>>(), vec![1, 5, 6]);
        assert_eq!(d.forget, vec![2, 3, 4]);
    }
}
