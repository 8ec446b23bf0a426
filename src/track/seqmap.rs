//! The in-memory sequence-number map of one disk: one `u32` stamp per block, grouped in
//! regions of `REGION_BLOCKS` blocks. A region nobody wrote since tracking began is not
//! allocated, so a sparse 1 TiB disk costs almost nothing; a fully written one costs 4 bytes
//! per block. Each region keeps its largest stamp, so "changed since S" skips every region
//! whose summary is not above S without looking at its blocks.

/// Blocks per region: one 4 KiB page of stamps on disk.
pub const REGION_BLOCKS: u64 = 1024;

#[derive(Debug, Clone)]
pub struct SeqMap {
    nblocks: u64,
    regions: Vec<Option<Box<[u32]>>>,
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
        self.regions[r].as_ref().map_or(0, |p| p[i])
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
        let mut b = start;
        let end = start + count;
        while b < end {
            let (r, i) = split(b);
            let n = ((REGION_BLOCKS as usize - i) as u64).min(end - b) as usize;
            let page = self.regions[r]
                .get_or_insert_with(|| vec![0u32; REGION_BLOCKS as usize].into_boxed_slice());
            for s in &mut page[i..i + n] {
                if *s < seq {
                    *s = seq;
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

    /// The stamps of a region as one page (zeros where unallocated).
    pub fn region_page(&self, region: u64) -> Option<&[u32]> {
        self.regions[region as usize].as_deref()
    }

    /// Install a region page read from disk.
    pub fn set_region(&mut self, region: u64, page: Box<[u32]>) {
        let r = region as usize;
        let max = page.iter().copied().max().unwrap_or(0);
        self.region_max[r] = max;
        self.regions[r] = if max == 0 { None } else { Some(page) };
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
        for (r, page) in self.regions.iter().enumerate() {
            if self.region_max[r] <= since {
                continue;
            }
            let page = page.as_ref().expect("a region with stamps is allocated");
            let base = r as u64 * REGION_BLOCKS;
            for (i, &s) in page.iter().enumerate() {
                if s > since {
                    push(base + i as u64);
                }
            }
        }
        out
    }

    /// Bytes of memory the stamps take.
    pub fn memory_bytes(&self) -> u64 {
        let pages = self.regions.iter().filter(|r| r.is_some()).count() as u64;
        pages * REGION_BLOCKS * 4 + self.regions.len() as u64 * 12
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

    #[test]
    fn sparse_map_is_small() {
        let m = SeqMap::new(16 << 20); // 1 TiB of 64 KiB blocks
        assert!(m.memory_bytes() < 1 << 20);
    }
}
