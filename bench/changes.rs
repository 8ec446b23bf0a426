//! Change-tracking benchmark: `changes` on a 1 TiB sparse disk with 1 % of its
//! blocks changed at random, reference point creation latency on 1 GiB and 1 TiB sparse
//! disks, and tracker memory. Prints a markdown table with the target beside each figure.
//!
//! Run: `cargo bench --bench changes` (release build). The sparse images live in a temp dir
//! under `$VMREF_BENCH_DIR` (default: the system temp dir); 1 % of a 1 TiB disk written one
//! byte per block takes about 700 MiB of real space there while the benchmark runs.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmref::engine::Engine;
use vmref::store::Store;
use vmref::store::records::RefState;

const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;
const BS: u64 = 64 << 10;

/// xorshift64*: a fixed-seed generator, so every run changes the same blocks.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn mib(b: u64) -> String {
    format!("{:.2} MiB", b as f64 / (1 << 20) as f64)
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn sparse(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

/// Median latency of `n` point creations on the engine.
fn point_latency(engine: &Engine, prefix: &str, n: usize) -> (Duration, Duration) {
    let mut v = Vec::new();
    for i in 0..n {
        let t = Instant::now();
        engine
            .ref_create(&format!("{prefix}{i}"), None, RefState::Plain)
            .unwrap();
        v.push(t.elapsed());
    }
    let max = *v.iter().max().unwrap();
    (median(v), max)
}

struct Row {
    what: String,
    figure: String,
    target: &'static str,
    ok: Option<bool>,
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not used.
    let base = std::env::var_os("VMREF_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(base).unwrap();
    let root = dir.path().join("store");
    Store::init(&root, BS as u32).unwrap();
    let small = dir.path().join("small.img");
    let big = dir.path().join("big.img");
    sparse(&small, GIB);
    sparse(&big, TIB);
    let mut rows = Vec::new();

    // Point creation on otherwise idle disks of each size, one disk registered at a time.
    let engine = Engine::open(Store::open(&root).unwrap()).unwrap();
    engine.disk_add("small", &small).unwrap();
    let (med, max) = point_latency(&engine, "s", 30);
    rows.push(Row {
        what: "point create, 1 GiB sparse disk (median of 30; max)".into(),
        figure: format!("{}; {}", ms(med), ms(max)),
        target: "< 5 ms",
        ok: Some(med < Duration::from_millis(5)),
    });
    engine.disk_remove("small").unwrap();
    let rss0 = rss_bytes();
    engine.disk_add("big", &big).unwrap();
    let idle_mem = engine.disk("big").unwrap().tracker().map().memory_bytes();
    let (med, max) = point_latency(&engine, "b", 30);
    rows.push(Row {
        what: "point create, 1 TiB sparse disk (median of 30; max)".into(),
        figure: format!("{}; {}", ms(med), ms(max)),
        target: "< 5 ms",
        ok: Some(med < Duration::from_millis(5)),
    });
    rows.push(Row {
        what: "tracker memory, 1 TiB disk, nothing written".into(),
        figure: mib(idle_mem),
        target: "≤ 64 MiB per TiB",
        ok: Some(idle_mem <= 64 << 20),
    });

    // 1 % of the blocks, spread at random, written through the tracked path (one byte each).
    engine.ref_create("base", None, RefState::Plain).unwrap();
    let nblocks = TIB / BS;
    let want = nblocks / 100;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut chosen = std::collections::HashSet::new();
    while (chosen.len() as u64) < want {
        chosen.insert(rng.next() % nblocks);
    }
    let disk = engine.disk("big").unwrap();
    let t = Instant::now();
    for &b in &chosen {
        disk.write_at(&[0xA5], b * BS + rng.next() % BS).unwrap();
    }
    let write_time = t.elapsed();
    // The image's own fsync of those scattered writes, apart from the point that follows.
    let t = Instant::now();
    disk.sync_data().unwrap();
    rows.push(Row {
        what: format!("fsync of the image after {want} scattered writes (data, not tracking)"),
        figure: ms(t.elapsed()),
        target: "(context)",
        ok: None,
    });
    drop(disk);
    let t = Instant::now();
    engine
        .ref_create("after-writes", None, RefState::Plain)
        .unwrap();
    let first_point = t.elapsed();
    rows.push(Row {
        what: format!(
            "point create right after {want} tracked writes (flushes {} dirty regions)",
            nblocks.div_ceil(1024)
        ),
        figure: ms(first_point),
        target: "(no target: first flush)",
        ok: None,
    });
    let (med, _) = point_latency(&engine, "c", 30);
    rows.push(Row {
        what: "point create, 1 TiB disk with 1 % changed (median of 30)".into(),
        figure: ms(med),
        target: "< 5 ms",
        ok: Some(med < Duration::from_millis(5)),
    });

    // The query itself, in process (tracker loaded).
    let mut times = Vec::new();
    let mut extents = 0;
    for _ in 0..11 {
        let t = Instant::now();
        let c = engine.changes("base", Some("big")).unwrap();
        times.push(t.elapsed());
        let changed: u64 = c[0].changed_bytes;
        extents = c[0].extents.len();
        assert!(
            changed >= want * BS - BS && changed <= want * BS,
            "{changed}"
        );
    }
    let q = median(times);
    rows.push(Row {
        what: format!("changes --since, 1 TiB, 1 % changed, in process ({extents} extents)"),
        figure: ms(q),
        target: "< 100 ms",
        ok: Some(q < Duration::from_millis(100)),
    });
    let mem = engine.disk("big").unwrap().tracker().map().memory_bytes();
    let stamps = nblocks * 4;
    let rss = rss_bytes().saturating_sub(rss0);
    rows.push(Row {
        what: "tracker memory, 1 TiB disk, 1 % changed at random (every region allocated)".into(),
        figure: format!(
            "{} ({} stamps + {} region summaries)",
            mib(mem),
            mib(stamps.min(mem)),
            mib(mem.saturating_sub(stamps))
        ),
        target: "≤ 64 MiB per TiB",
        ok: Some(mem <= 64 << 20),
    });
    rows.push(Row {
        what: "process RSS growth since the 1 TiB disk was added".into(),
        figure: mib(rss),
        target: "(context)",
        ok: None,
    });
    engine.close().unwrap();
    drop(engine);

    // End to end: the release binary opens the store (loads and checks the map) and answers.
    let bin = env!("CARGO_BIN_EXE_vmref");
    let run = |args: &[&str]| {
        let t = Instant::now();
        let st = Command::new(bin)
            .arg("--store")
            .arg(&root)
            .args(args)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        t.elapsed()
    };
    let cli: Vec<Duration> = (0..5)
        .map(|_| run(&["changes", "--since", "base", "--json"]))
        .collect();
    let cli = median(cli);
    rows.push(Row {
        what: "`vmref changes --since --json` end to end (open store, load map, print)".into(),
        figure: ms(cli),
        target: "< 100 ms",
        ok: Some(cli < Duration::from_millis(100)),
    });
    let text = median(
        (0..5)
            .map(|_| run(&["changes", "--since", "base"]))
            .collect(),
    );
    rows.push(Row {
        what: "`vmref changes --since` (text) end to end".into(),
        figure: ms(text),
        target: "< 100 ms",
        ok: Some(text < Duration::from_millis(100)),
    });
    let st: Vec<Duration> = (0..5).map(|_| run(&["status"])).collect();
    rows.push(Row {
        what: "`vmref status` end to end (open store and load the 1 TiB map)".into(),
        figure: ms(median(st)),
        target: "(context)",
        ok: None,
    });

    println!(
        "\n{want} random tracked one-byte writes took {:.1} s ({:.1} µs each, log marks included)\n",
        write_time.as_secs_f64(),
        write_time.as_secs_f64() * 1e6 / want as f64
    );
    println!("| measurement | figure | target | met |");
    println!("|---|---|---|---|");
    for r in rows {
        let ok = match r.ok {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "",
        };
        println!("| {} | {} | {} | {} |", r.what, r.figure, r.target, ok);
    }
}
