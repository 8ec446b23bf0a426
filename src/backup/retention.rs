//! Which restorable points a retention policy keeps (`prune`), as restic and Proxmox Backup
//! Server choose them. The selection is a pure function of the points (name, creation time,
//! owner), the policy and a calendar function that gives an instant's local date and hour, so
//! tests fix the time zone; `calendar_in` builds that function from a time zone.
//!
//! Semantics:
//! - Points are taken in creation order (the store's serial numbers): "newest" is the point
//!   created last, whatever the clock said, so a clock stepped back never reorders them. The
//!   creation time only places a point in its hour, day, ISO week, month and year, in local
//!   time.
//! - `--keep-last N` keeps the newest N points. `--keep-hourly/daily/weekly/monthly/yearly N`
//!   keeps the newest point of each of the N most recent hours, days, ISO weeks (which may
//!   start in the previous year), months or years that have a point; a period with no point
//!   does not count. Walking from the newest point back, the first point met in a period is
//!   the newest of that period; a period is counted once even if a DST change makes its
//!   local times come back later (the hour repeated when clocks fall back is one hour `02`).
//! - A point kept by any rule is kept, and the report lists every rule that keeps it.
//! - Scope: a policy applies to the points of one owner: `--owner O` to O's points, no
//!   `--owner` to the points without an owner. Points of any other owner are neither kept
//!   nor deleted by it. (Metadata-only points are never candidates: the caller passes
//!   restorable points only.)

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The rules of one prune: how many periods of each kind to keep (`None`: rule not used).
/// Also the `prune` command's flags (flattened into it by `cli`), so the two never drift.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
pub struct Policy {
    /// Keep the newest N points
    #[arg(long, value_name = "N")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    /// Keep the newest point of each of the last N hours that have one
    #[arg(long, value_name = "N")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_hourly: Option<u32>,
    /// Keep the newest point of each of the last N days that have one
    #[arg(long, value_name = "N")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<u32>,
    /// Keep the newest point of each of the last N ISO weeks (Monday to Sunday) that have one
    #[arg(long, value_name = "N")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<u32>,
    /// Keep the newest point of each of the last N months that have one
    #[arg(long, value_name = "N")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_monthly: Option<u32>,
    /// Keep the newest point of each of the last N years that have one
    #[arg(long, value_name = "N")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_yearly: Option<u32>,
}

impl Policy {
    /// The rules in use with their counts, in the order reports list them.
    pub fn rules(&self) -> Vec<(Rule, u32)> {
        [
            (Rule::Last, self.keep_last),
            (Rule::Hourly, self.keep_hourly),
            (Rule::Daily, self.keep_daily),
            (Rule::Weekly, self.keep_weekly),
            (Rule::Monthly, self.keep_monthly),
            (Rule::Yearly, self.keep_yearly),
        ]
        .into_iter()
        .filter_map(|(r, n)| n.map(|n| (r, n)))
        .collect()
    }

    /// At least one rule, none of them 0.
    ///
    /// # Errors
    /// `BadArgument` saying what is missing or wrong.
    pub fn validate(&self) -> Result<()> {
        let rules = self.rules();
        if rules.is_empty() {
            return Err(Error::BadArgument(
                "prune needs at least one of --keep-last, --keep-hourly, --keep-daily, \
                 --keep-weekly, --keep-monthly, --keep-yearly (or a [retention] table in the \
                 config file)"
                    .into(),
            ));
        }
        if let Some((r, _)) = rules.iter().find(|(_, n)| *n == 0) {
            return Err(Error::BadArgument(format!(
                "--keep-{} must be at least 1 (use `ref delete` to remove every point)",
                r.as_str()
            )));
        }
        Ok(())
    }
}

/// One retention rule; serialized as its word (`"daily"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rule {
    Last,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Last => "last",
            Rule::Hourly => "hourly",
            Rule::Daily => "daily",
            Rule::Weekly => "weekly",
            Rule::Monthly => "monthly",
            Rule::Yearly => "yearly",
        }
    }

    /// The period of a point under this rule: equal keys, same period. `index` makes every
    /// point its own period for `Last`.
    fn period(self, c: &Calendar, index: usize) -> [i64; 4] {
        let (y, m, d, h) = (
            i64::from(c.year),
            i64::from(c.month),
            i64::from(c.day),
            i64::from(c.hour),
        );
        match self {
            Rule::Last => [index as i64, -1, -1, -1],
            Rule::Hourly => [y, m, d, h],
            Rule::Daily => [y, m, d, -1],
            Rule::Weekly => [i64::from(c.iso_year), i64::from(c.iso_week), -1, -1],
            Rule::Monthly => [y, m, -1, -1],
            Rule::Yearly => [y, -1, -1, -1],
        }
    }
}

/// An instant's local calendar fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Calendar {
    pub year: i32,
    /// 1 to 12.
    pub month: u8,
    /// 1 to 31.
    pub day: u8,
    /// 0 to 23, as the local clock shows it.
    pub hour: u8,
    /// The ISO 8601 week-numbering year and week (1 to 53): week 1 holds the year's first
    /// Thursday, so 2024-12-30 is in week 1 of 2025.
    pub iso_year: i32,
    pub iso_week: u8,
}

/// A restorable point as the selection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub name: &'a str,
    pub created_unix: u64,
    pub owner: Option<&'a str>,
}

/// A kept point and every rule that keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept {
    pub name: String,
    pub rules: Vec<Rule>,
}

/// What a policy does to the points in its scope, each list oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    pub kept: Vec<Kept>,
    pub deleted: Vec<String>,
}

/// Apply `policy` to the points of `scope` (an owner, or `None` for points without one).
/// `points` are in creation order, oldest first; `calendar` gives an instant's local fields.
pub fn select(
    points: &[Candidate<'_>],
    policy: &Policy,
    scope: Option<&str>,
    calendar: &dyn Fn(u64) -> Calendar,
) -> Selection {
    let in_scope: Vec<&Candidate<'_>> = points.iter().filter(|p| p.owner == scope).collect();
    let mut rules: Vec<(Rule, u32, HashSet<[i64; 4]>)> = policy
        .rules()
        .into_iter()
        .map(|(r, n)| (r, n, HashSet::new()))
        .collect();
    let mut keeps: Vec<Vec<Rule>> = vec![Vec::new(); in_scope.len()];
    for (i, p) in in_scope.iter().enumerate().rev() {
        let c = calendar(p.created_unix);
        for (rule, left, seen) in &mut rules {
            if *left > 0 && seen.insert(rule.period(&c, i)) {
                *left -= 1;
                keeps[i].push(*rule);
            }
        }
    }
    let mut s = Selection::default();
    for (p, rules) in in_scope.iter().zip(keeps) {
        if rules.is_empty() {
            s.deleted.push(p.name.to_string());
        } else {
            s.kept.push(Kept {
                name: p.name.to_string(),
                rules,
            });
        }
    }
    s
}

/// The calendar function of a time zone.
pub fn calendar_in(tz: &jiff::tz::TimeZone) -> impl Fn(u64) -> Calendar + '_ {
    move |t| {
        let ts = i64::try_from(t)
            .ok()
            .and_then(|s| jiff::Timestamp::from_second(s).ok())
            .unwrap_or(jiff::Timestamp::MAX);
        let dt = tz.to_datetime(ts);
        let w = dt.date().iso_week_date();
        Calendar {
            year: i32::from(dt.year()),
            month: dt.month() as u8,
            day: dt.day() as u8,
            hour: dt.hour() as u8,
            iso_year: i32::from(w.year()),
            iso_week: w.week() as u8,
        }
    }
}

/// The time zone named by a `TZ` value, read as the C library reads it: unset, the system's
/// zone (`/etc/localtime`, else UTC); empty, UTC; `:` followed by, or else, an absolute path
/// of a TZif file, a zone name of the time zone database (`Europe/Berlin`) or a POSIX TZ rule
/// (`CET-1CEST,M3.5.0,M10.5.0/3`). The command sends its own `TZ`, so a prune carried out by
/// the daemon uses the zone of the shell that asked for it.
///
/// # Errors
/// `BadArgument` for a value that names no zone (the C library would fall back to UTC
/// silently; a prune should not).
pub fn zone(tz: Option<&str>) -> Result<jiff::tz::TimeZone> {
    use jiff::tz::TimeZone;
    let tzif = |path: &str| {
        std::fs::read(path)
            .ok()
            .and_then(|b| TimeZone::tzif(path, &b).ok())
    };
    let Some(v) = tz else {
        return Ok(tzif("/etc/localtime").unwrap_or(TimeZone::UTC));
    };
    let name = v.strip_prefix(':').unwrap_or(v);
    if name.is_empty() {
        return Ok(TimeZone::UTC);
    }
    let found = if name.starts_with('/') {
        tzif(name)
    } else {
        TimeZone::get(name)
            .ok()
            .or_else(|| TimeZone::posix(name).ok())
    };
    found.ok_or_else(|| Error::BadArgument(format!("TZ={v}: no such time zone")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BERLIN: &str = "CET-1CEST,M3.5.0,M10.5.0/3";
    const NEW_YORK: &str = "EST5EDT,M3.2.0,M11.1.0";

    fn pts(times: &[(&'static str, u64)]) -> Vec<Candidate<'static>> {
        times
            .iter()
            .map(|&(name, created_unix)| Candidate {
                name,
                created_unix,
                owner: None,
            })
            .collect()
    }

    /// (kept names with their rules, deleted names).
    fn run(
        points: &[Candidate<'_>],
        policy: Policy,
        tz: &str,
    ) -> (Vec<(String, Vec<&'static str>)>, Vec<String>) {
        let z = zone(Some(tz)).unwrap();
        let s = select(points, &policy, None, &calendar_in(&z));
        (
            s.kept
                .into_iter()
                .map(|k| (k.name, k.rules.iter().map(|r| r.as_str()).collect()))
                .collect(),
            s.deleted,
        )
    }

    fn kept(v: &[(&str, &[&'static str])]) -> Vec<(String, Vec<&'static str>)> {
        v.iter().map(|(n, r)| (n.to_string(), r.to_vec())).collect()
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn calendar_fields_by_hand() {
        let utc = zone(Some("UTC0")).unwrap();
        let c = calendar_in(&utc);
        // 2024-12-30 00:00:00 UTC, a Monday: ISO week 1 of 2025.
        assert_eq!(
            c(1_735_516_800),
            Calendar {
                year: 2024,
                month: 12,
                day: 30,
                hour: 0,
                iso_year: 2025,
                iso_week: 1
            }
        );
        // 2021-01-03 12:00 UTC, a Sunday: ISO week 53 of 2020.
        let x = c(1_609_675_200);
        assert_eq!((x.year, x.iso_year, x.iso_week), (2021, 2020, 53));
        // Berlin: 2024-03-31 01:30 UTC is 03:30 CEST (the clock jumped from 02:00 to 03:00).
        let b = zone(Some(BERLIN)).unwrap();
        assert_eq!(calendar_in(&b)(1_711_848_600).hour, 3);
        // 2024-10-27 00:30 UTC is 02:30 CEST, 01:30 UTC is 02:30 CET: the same local hour.
        assert_eq!(calendar_in(&b)(1_729_989_000).hour, 2);
        assert_eq!(calendar_in(&b)(1_729_992_600).hour, 2);
        // Out of range times do not panic.
        let _ = c(u64::MAX);
    }

    #[test]
    fn daily_and_monthly_across_a_month_and_year_boundary() {
        // UTC; every point at 12:00 unless said.
        let p = pts(&[
            ("nov30", 1_732_968_000),  // 2024-11-30 12:00
            ("dec30", 1_735_560_000),  // 2024-12-30 12:00
            ("dec31a", 1_735_646_400), // 2024-12-31 12:00
            ("dec31b", 1_735_689_599), // 2024-12-31 23:59:59
            ("jan01a", 1_735_689_600), // 2025-01-01 00:00:00
            ("jan01b", 1_735_732_800), // 2025-01-01 12:00
            ("jan02", 1_735_819_200),  // 2025-01-02 12:00
        ]);
        let (k, d) = run(
            &p,
            Policy {
                keep_daily: Some(3),
                ..Policy::default()
            },
            "UTC0",
        );
        // Days, newest first: Jan 2, Jan 1 (newest: jan01b), Dec 31 (newest: dec31b).
        assert_eq!(
            k,
            kept(&[
                ("dec31b", &["daily"]),
                ("jan01b", &["daily"]),
                ("jan02", &["daily"])
            ])
        );
        assert_eq!(d, names(&["nov30", "dec30", "dec31a", "jan01a"]));

        let (k, d) = run(
            &p,
            Policy {
                keep_monthly: Some(3),
                keep_yearly: Some(2),
                keep_last: Some(1),
                ..Policy::default()
            },
            "UTC0",
        );
        // Months: Jan 2025 (jan02), Dec 2024 (dec31b), Nov 2024 (nov30).
        // Years: 2025 (jan02), 2024 (dec31b). Last: jan02.
        assert_eq!(
            k,
            kept(&[
                ("nov30", &["monthly"]),
                ("dec31b", &["monthly", "yearly"]),
                ("jan02", &["last", "monthly", "yearly"]),
            ])
        );
        assert_eq!(d, names(&["dec30", "dec31a", "jan01a", "jan01b"]));

        // The same instants in New York: 2025-01-01 00:00 UTC is Dec 31 19:00 there, so
        // jan01a falls on Dec 31 and is that day's newest; dec31b (18:59) is not.
        let (k, _) = run(
            &p,
            Policy {
                keep_daily: Some(3),
                ..Policy::default()
            },
            NEW_YORK,
        );
        assert_eq!(
            k,
            kept(&[
                ("jan01a", &["daily"]),
                ("jan01b", &["daily"]),
                ("jan02", &["daily"])
            ])
        );
    }

    #[test]
    fn iso_weeks_span_the_year_boundary() {
        // UTC, at 12:00. ISO week 52 of 2024 is Dec 23-29; week 1 of 2025 is Dec 30 - Jan 5;
        // week 2 of 2025 starts Jan 6.
        let p = pts(&[
            ("dec23", 1_734_955_200), // Mon, 2024-W52
            ("dec29", 1_735_473_600), // Sun, 2024-W52
            ("dec30", 1_735_560_000), // Mon, 2025-W01
            ("jan05", 1_736_078_400), // Sun, 2025-W01
            ("jan06", 1_736_164_800), // Mon, 2025-W02
        ]);
        let (k, d) = run(
            &p,
            Policy {
                keep_weekly: Some(3),
                keep_yearly: Some(1),
                ..Policy::default()
            },
            "UTC0",
        );
        // Weekly: jan06 (W02), jan05 (W01, which holds dec30 too), dec29 (W52).
        // Yearly is by calendar year: 2025 -> jan06 only.
        assert_eq!(
            k,
            kept(&[
                ("dec29", &["weekly"]),
                ("jan05", &["weekly"]),
                ("jan06", &["weekly", "yearly"])
            ])
        );
        assert_eq!(d, names(&["dec23", "dec30"]));
    }

    #[test]
    fn hourly_and_daily_across_dst_changes() {
        // Berlin, autumn 2024: at 03:00 CEST (01:00 UTC) clocks go back to 02:00 CET.
        let fall = pts(&[
            ("cest0130", 1_729_985_400), // 23:30 Z = 01:30 CEST
            ("cest0210", 1_729_988_400), // 00:20 Z = 02:20 CEST
            ("cest0250", 1_729_990_200), // 00:50 Z = 02:50 CEST
            ("cet0210", 1_729_991_400),  // 01:10 Z = 02:10 CET
            ("cet0250", 1_729_993_800),  // 01:50 Z = 02:50 CET
            ("cet0310", 1_729_995_000),  // 02:10 Z = 03:10 CET
        ]);
        let (k, d) = run(
            &fall,
            Policy {
                keep_hourly: Some(3),
                ..Policy::default()
            },
            BERLIN,
        );
        // Local hours, newest first: 03 (cet0310), 02 (two real hours, one local hour: its
        // newest is cet0250), 01 (cest0130).
        assert_eq!(
            k,
            kept(&[
                ("cest0130", &["hourly"]),
                ("cet0250", &["hourly"]),
                ("cet0310", &["hourly"])
            ])
        );
        assert_eq!(d, names(&["cest0210", "cest0250", "cet0210"]));
        // A day of 25 hours is one day.
        let (k, _) = run(
            &fall,
            Policy {
                keep_daily: Some(5),
                ..Policy::default()
            },
            BERLIN,
        );
        assert_eq!(k, kept(&[("cet0310", &["daily"])]));

        // New York, spring 2024: at 02:00 EST (07:00 UTC) clocks jump to 03:00 EDT, so the
        // day has 23 hours and no hour 02.
        let spring = pts(&[
            ("mar09_2300", 1_710_043_200), // 04:00 Z Mar 10 = Mar 9 23:00 EST
            ("mar10_0130", 1_710_052_200), // 06:30 Z = 01:30 EST
            ("mar10_0159", 1_710_053_940), // 06:59 Z = 01:59 EST
            ("mar10_0300", 1_710_054_000), // 07:00 Z = 03:00 EDT
            ("mar10_2359", 1_710_129_540), // 03:59 Z Mar 11 = 23:59 EDT
            ("mar11_0000", 1_710_129_600), // 04:00 Z Mar 11 = 00:00 EDT
        ]);
        let (k, d) = run(
            &spring,
            Policy {
                keep_hourly: Some(3),
                keep_daily: Some(2),
                ..Policy::default()
            },
            NEW_YORK,
        );
        // Hours newest first: Mar 11 00, Mar 10 23, Mar 10 03. Days: Mar 11, Mar 10.
        assert_eq!(
            k,
            kept(&[
                ("mar10_0300", &["hourly"]),
                ("mar10_2359", &["hourly", "daily"]),
                ("mar11_0000", &["hourly", "daily"]),
            ])
        );
        assert_eq!(d, names(&["mar09_2300", "mar10_0130", "mar10_0159"]));
    }

    #[test]
    fn periods_without_points_do_not_count_and_order_is_creation_order() {
        // Daily over days 1, 2 and 10 of a month (UTC): --keep-daily 3 keeps all three.
        let day = 86_400;
        let t0 = 1_704_067_200; // 2024-01-01 00:00 Z
        let p = pts(&[
            ("d1", t0 + 3600),
            ("d2", t0 + day + 3600),
            ("d10", t0 + 9 * day + 3600),
        ]);
        let daily = Policy {
            keep_daily: Some(3),
            ..Policy::default()
        };
        let (k, d) = run(&p, daily, "UTC0");
        assert_eq!(k.len(), 3);
        assert!(d.is_empty());
        // A clock stepped back: "late" was created after "early" but carries an earlier time
        // on the same day. Creation order decides: late is that day's newest.
        let p = pts(&[("early", t0 + 7200), ("late", t0 + 3600)]);
        let (k, d) = run(&p, daily, "UTC0");
        assert_eq!(k, kept(&[("late", &["daily"])]));
        assert_eq!(d, names(&["early"]));
        // keep-last alone, as the old prune did.
        let p = pts(&[("a", t0), ("b", t0), ("c", t0)]);
        let (k, d) = run(
            &p,
            Policy {
                keep_last: Some(2),
                ..Policy::default()
            },
            "UTC0",
        );
        assert_eq!(k, kept(&[("b", &["last"]), ("c", &["last"])]));
        assert_eq!(d, names(&["a"]));
    }

    #[test]
    fn scope_is_one_owner_or_the_ownerless_points() {
        let t0 = 1_704_067_200;
        let p = [
            Candidate {
                name: "mine1",
                created_unix: t0,
                owner: Some("veeam"),
            },
            Candidate {
                name: "plain1",
                created_unix: t0 + 1,
                owner: None,
            },
            Candidate {
                name: "other",
                created_unix: t0 + 2,
                owner: Some("borg"),
            },
            Candidate {
                name: "mine2",
                created_unix: t0 + 3,
                owner: Some("veeam"),
            },
            Candidate {
                name: "plain2",
                created_unix: t0 + 4,
                owner: None,
            },
        ];
        let last1 = Policy {
            keep_last: Some(1),
            ..Policy::default()
        };
        let utc = zone(Some("UTC0")).unwrap();
        let cal = calendar_in(&utc);
        let s = select(&p, &last1, Some("veeam"), &cal);
        assert_eq!(s.deleted, names(&["mine1"]));
        assert_eq!(s.kept.len(), 1);
        assert_eq!(s.kept[0].name, "mine2");
        let s = select(&p, &last1, None, &cal);
        assert_eq!(s.deleted, names(&["plain1"]));
        assert_eq!(s.kept[0].name, "plain2");
        let s = select(&p, &last1, Some("nobody"), &cal);
        assert_eq!(s, Selection::default());
    }

    #[test]
    fn policy_validation_and_zones() {
        assert!(Policy::default().validate().is_err());
        let e = Policy {
            keep_daily: Some(0),
            keep_last: Some(2),
            ..Policy::default()
        }
        .validate()
        .unwrap_err();
        assert!(
            e.to_string().contains("--keep-daily must be at least 1"),
            "{e}"
        );
        assert!(
            Policy {
                keep_yearly: Some(1),
                ..Policy::default()
            }
            .validate()
            .is_ok()
        );
        assert_eq!(zone(Some("")).unwrap(), jiff::tz::TimeZone::UTC);
        assert!(zone(Some(":")).is_ok());
        assert!(zone(Some("No/Such_Zone")).is_err());
        assert!(zone(Some("/nonexistent/zone")).is_err());
        assert!(zone(None).is_ok());
    }
}
