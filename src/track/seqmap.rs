//! The in-memory sequence-number map of one disk: one stamp per block, grouped in regions of
//! `REGION_BLOCKS` blocks. Each region keeps its largest stamp, so "changed since S" skips every
//! region whose summary is not above S without looking at its blocks.
//!
//! Memory: a region nobody wrote since tracking began is not allocated; one with few stamped
//! blocks keeps (index, stamp) pairs; a busy one keeps 16-bit offsets from its smallest stamp
//! (sequence numbers of one region rarely span 65 535 points), and only otherwise 4 bytes per
//! block. So a 1 TiB disk costs well under 64 MiB whatever the number of points, and a sparse or
//! lightly written one a few MiB.

/// Blocks per region: one 4 KiB page of stamps on disk.
pub const REGION_BLOCKS: u64 = 1024;
const RB: usize = REGION_BLOCKS as usize;
/// Pairs (8 bytes each) a sparse region holds before a page (2 KiB narrow) is smaller.
const SPARSE_MAX: usize = 256;

#[derive(Debug, Clone)]
enum Region {
    /// Sorted by index; stamps are non-zero.
    Sparse(Vec<(u16, u32)>),
    /// Stamp = 0 where the delta is 0, else `base + delta - 1`.
    Narrow {
        base: u32,
        deltas: Box<[u16]>,
    },
    Wide(Box<[u32]>),
}

impl Region {
    /// The smallest representation of a page of stamps; None when all are zero.
    fn encode(page: &[u32]) -> Option<Region> {
        let nonzero = page.iter().filter(|&&s| s != 0).count();
        if nonzero == 0 {
            return None;
        }
        if nonzero <= SPARSE_MAX {
            return Some(Region::Sparse(
                page.iter()
                    .enumerate()
                    .filter(|(_, s)| **s != 0)
                    .map(|(i, &s)| (i as u16, s))
                    .collect(),
            ));
        }
        let base = page.iter().copied().filter(|&s| s != 0).min().unwrap_or(1);
        let max = page.iter().copied().max().unwrap_or(0);
        if max - base < u16::MAX as u32 {
            let deltas = page
                .iter()
                .map(|&s| if s == 0 { 0 } else { (s - base + 1) as u16 })
                .collect();
            return Some(Region::Narrow { base, deltas });
        }
        Some(Region::Wide(page.into()))
    }

    fn get(&self, i: usize) -> u32 {
        match self {
            Region::Sparse(v) => v
                .binary_search_by_key(&(i as u16), |p| p.0)
                .map_or(0, |k| v[k].1),
            Region::Narrow { base, deltas } => match deltas[i] {
                0 => 0,
                d => base + d as u32 - 1,
            },
            Region::Wide(p) => p[i],
        }
    }

    fn page(&self) -> Vec<u32> {
        match self {
            Region::Wide(p) => p.to_vec(),
            _ => (0..RB).map(|i| self.get(i)).collect(),
        }
    }

    /// Raise stamps `i..i+n` to at least `seq`.
    fn stamp(&mut self, i: usize, n: usize, seq: u32) {
        match self {
            Region::Sparse(v) if v.len() + n <= SPARSE_MAX => {
                for k in i..i + n {
                    match v.binary_search_by_key(&(k as u16), |p| p.0) {
                        Ok(at) => v[at].1 = v[at].1.max(seq),
                        Err(at) => v.insert(at, (k as u16, seq)),
                    }
                }
                return;
            }
            Region::Narrow { base, deltas } if seq >= *base && seq - *base < u16::MAX as u32 => {
                let d = (seq - *base + 1) as u16;
                for x in &mut deltas[i..i + n] {
                    *x = (*x).max(d);
                }
                return;
            }
            Region::Wide(p) => {
                for x in &mut p[i..i + n] {
                    *x = (*x).max(seq);
                }
                return;
            }
            _ => {}
        }
        // The representation no longer fits: re-encode the whole page.
        let mut page = self.page();
        for x in &mut page[i..i + n] {
            *x = (*x).max(seq);
        }
        *self = Region::encode(&page).expect("a stamped region is not empty");
    }

    fn heap_bytes(&self) -> u64 {
        match self {
            Region::Sparse(v) => v.capacity() as u64 * 8,
            Region::Narrow { .. } => RB as u64 * 2,
            Region::Wide(_) => RB as u64 * 4,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SeqMap {
    nblocks: u64,
    regions: Vec<Option<Region>>,
    region_max: Vec<u32>,
}

/// A run of consecutive changed blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRun {
    pub start: u64,
    pub count: u64,
}

pub fn regions_for(nblocks: u64) -> u64 {
    nblocks.div_ceil(REGION_BLOCKS)
}

impl SeqMap {
    pub fn new(nblocks: u64) -> SeqMap {
        let n = regions_for(nblocks) as usize;
        SeqMap {
            nblocks,
            regions: vec![None; n],
            region_max: vec![0; n],
        }
    }

    pub fn nblocks(&self) -> u64 {
        self.nblocks
    }

    pub fn nregions(&self) -> u64 {
        self.regions.len() as u64
    }

    pub fn get(&self, block: u64) -> u32 {
        let (r, i) = split(block);
        self.regions[r].as_ref().map_or(0, |p| p.get(i))
    }

    pub fn region_max(&self, region: u64) -> u32 {
        self.region_max[region as usize]
    }

    /// Stamp blocks `start..start+count` with `seq` (never lowering a stamp).
    pub fn stamp(&mut self, start: u64, count: u64, seq: u32) {
        assert!(
            start + count <= self.nblocks,
            "stamp past the end of the map"
        );
        if seq == 0 {
            return;
        }
        let mut b = start;
        let end = start + count;
        while b < end {
            let (r, i) = split(b);
            let n = ((RB - i) as u64).min(end - b) as usize;
            match &mut self.regions[r] {
                Some(region) => region.stamp(i, n, seq),
                slot @ None => {
                    let mut page = vec![0u32; RB];
                    page[i..i + n].iter_mut().for_each(|x| *x = seq);
                    *slot = Region::encode(&page);
                }
            }
            if self.region_max[r] < seq {
                self.region_max[r] = seq;
            }
            b += n as u64;
        }
    }

    /// Stamp every block of a region (crash recovery of a durably marked region).
    pub fn stamp_region(&mut self, region: u64, seq: u32) {
        let start = region * REGION_BLOCKS;
        let count = REGION_BLOCKS.min(self.nblocks - start);
        self.stamp(start, count, seq);
    }

    /// The stamps of a region as one page, or None when none is set.
    pub fn region_page(&self, region: u64) -> Option<Vec<u32>> {
        self.regions[region as usize].as_ref().map(Region::page)
    }

    /// Install a region page read from disk.
    pub fn set_region(&mut self, region: u64, page: &[u32]) {
        let r = region as usize;
        self.region_max[r] = page.iter().copied().max().unwrap_or(0);
        self.regions[r] = Region::encode(page);
    }

    /// Forget every stamp (tracking restarted).
    pub fn clear(&mut self) {
        self.regions.iter_mut().for_each(|r| *r = None);
        self.region_max.iter_mut().for_each(|m| *m = 0);
    }

    /// Runs of blocks whose stamp is greater than `since`, sorted and merged.
    pub fn changed_since(&self, since: u32) -> Vec<BlockRun> {
        let mut out: Vec<BlockRun> = Vec::new();
        let mut push = |b: u64| match out.last_mut() {
            Some(run) if run.start + run.count == b => run.count += 1,
            _ => out.push(BlockRun { start: b, count: 1 }),
        };
        for (r, region) in self.regions.iter().enumerate() {
            if self.region_max[r] <= since {
                continue;
            }
            let base = r as u64 * REGION_BLOCKS;
            match region.as_ref().expect("a region with stamps is allocated") {
                Region::Sparse(v) => v
                    .iter()
                    .filter(|p| p.1 > since)
                    .for_each(|p| push(base + p.0 as u64)),
                Region::Narrow { base: b0, deltas } => {
                    // Stamps above `since` are exactly the deltas above this threshold.
                    let t = if since < *b0 {
                        0
                    } else {
                        (since - b0 + 1) as u16
                    };
                    for (i, &d) in deltas.iter().enumerate() {
                        if d > t {
                            push(base + i as u64);
                        }
                    }
                }
                Region::Wide(p) => {
                    for (i, &s) in p.iter().enumerate() {
                        if s > since {
                            push(base + i as u64);
                        }
                    }
                }
            }
        }
        out
    }

    /// Bytes of memory the map takes (stamps and per-region summaries).
    pub fn memory_bytes(&self) -> u64 {
        let heap: u64 = self.regions.iter().flatten().map(Region::heap_bytes).sum();
        heap + self.regions.len() as u64
            * (std::mem::size_of::<Option<Region>>() + std::mem::size_of::<u32>()) as u64
    }
}

fn split(block: u64) -> (usize, usize) {
    (
        (block / REGION_BLOCKS) as usize,
        (block % REGION_BLOCKS) as usize,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_and_changes_merge_across_regions() {
        let mut m = SeqMap::new(3000);
        m.stamp(1020, 10, 2);
        m.stamp(5, 1, 1);
        m.stamp(2999, 1, 3);
        assert_eq!(
            m.changed_since(1),
            vec![
                BlockRun {
                    start: 1020,
                    count: 10
                },
                BlockRun {
                    start: 2999,
                    count: 1
                }
            ]
        );
        assert_eq!(m.changed_since(0).len(), 3);
        assert!(m.changed_since(3).is_empty());
        assert_eq!(m.get(1025), 2);
        assert_eq!(m.region_max(2), 3);
    }

    #[test]
    fn stamp_never_lowers() {
        let mut m = SeqMap::new(10);
        m.stamp(0, 10, 5);
        m.stamp(0, 10, 3);
        assert_eq!(m.get(9), 5);
    }

    /// Every representation answers like a plain array, through every transition.
    #[test]
    fn representations_agree_with_a_plain_array() {
        let mut seed = 7u64;
        let mut rnd = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..30 {
            let nb = 3 * REGION_BLOCKS - 17;
            let mut m = SeqMap::new(nb);
            let mut model = vec![0u32; nb as usize];
            let mut seq = 1 + rnd(5) as u32;
            for _ in 0..200 {
                let start = rnd(nb);
                let span = if rnd(4) == 0 { 600 } else { 3 };
                let count = (1 + rnd(span)).min(nb - start);
                // Mostly rising numbers; now and then a jump past the 16-bit span.
                seq += match rnd(50) {
                    0 if round % 3 == 0 => 70_000,
                    n if n < 10 => 1,
                    _ => 0,
                };
                let s = if rnd(20) == 0 { seq / 2 } else { seq };
                m.stamp(start, count, s);
                for x in &mut model[start as usize..(start + count) as usize] {
                    *x = (*x).max(s);
                }
                let probe = rnd(nb);
                assert_eq!(m.get(probe), model[probe as usize]);
            }
            for since in [0, 1, seq / 3, seq / 2, seq - 1, seq] {
                let want: Vec<u64> = (0..nb).filter(|&b| model[b as usize] > since).collect();
                let got: Vec<u64> = m
                    .changed_since(since)
                    .iter()
                    .flat_map(|r| r.start..r.start + r.count)
                    .collect();
                assert_eq!(got, want, "round {round} since {since}");
            }
            for r in 0..m.nregions() {
                let page = m.region_page(r).unwrap_or_else(|| vec![0; RB]);
                let s = (r * REGION_BLOCKS) as usize;
                let e = (s + RB).min(nb as usize);
                assert_eq!(&page[..e - s], &model[s..e]);
                let mut copy = SeqMap::new(nb);
                copy.set_region(r, &page);
                assert_eq!(copy.region_page(r), m.region_page(r));
            }
        }
    }

    #[test]
    fn one_percent_of_a_terabyte_is_small() {
        let nb = 16u64 << 20; // 1 TiB of 64 KiB blocks
        let mut m = SeqMap::new(nb);
        for k in 0..nb / 100 {
            m.stamp(k * 100 + k % 97, 1, 2 + (k % 5) as u32);
        }
        assert!(m.memory_bytes() < 4 << 20, "{}", m.memory_bytes());
        m.stamp(0, nb, 9);
        assert!(m.memory_bytes() <= 34 << 20, "{}", m.memory_bytes());
    }

    #[test]
    fn sparse_map_is_small() {
        let m = SeqMap::new(16 << 20); // 1 TiB of 64 KiB blocks
        assert!(m.memory_bytes() < 1 << 20);
    }
}
