//! Self-healing (issue 13): `verify --repair` stores damaged blocks again from the live disk
//! wherever tracking proves the live block unchanged since a point that needs it; what no live
//! disk can vouch for stays damaged and is named; and the next backup stores a block known
//! damaged again instead of deduplicating against the bad copy. Every point is compared with
//! the model of its bytes afterwards.

mod common;

use common::{BS, Env, Rng, assert_same, find_blob, flip, point_block_hash, test_seed};

const SIZE: usize = 1 << 20;

#[test]
fn repair_from_the_live_disk_where_tracking_vouches_for_it() {
    let seed = test_seed("repair_from_the_live_disk_where_tracking_vouches_for_it");
    let mut rng = Rng(seed | 1);
    let mut init = vec![0u8; SIZE];
    rng.fill(&mut init);
    let mut e = Env::new(SIZE, &init);
    e.ok(&["backup", "p1"]);
    let m1 = e.model.clone();
    // Block 10 changes after p1; block 20 does not.
    let mut new = vec![0u8; BS];
    rng.fill(&mut new);
    e.write(&[(10 * BS as u64, new)]);
    e.ok(&["backup", "p2"]);
    let m2 = e.model.clone();
    let h10 = point_block_hash(&e.store, "p1", "disk0", 10);
    let h20 = point_block_hash(&e.store, "p1", "disk0", 20);
    // Both located before either is damaged (a damaged pack no longer lists its blobs).
    let (p10, b10) = find_blob(&e.store, &h10);
    let (p20, b20) = find_blob(&e.store, &h20);
    flip(&p10, b10.offset + b10.stored_len as u64 / 2);
    flip(&p20, b20.offset + b20.stored_len as u64 / 2);
    // Plain verify names both and repairs nothing.
    let out = e.verify_fails(&[]);
    assert!(
        out.contains("block 10") && out.contains("block 20"),
        "{out}"
    );
    // Repair: block 20 is unchanged since p1 (and p2) on the live disk, block 10 is not.
    let o = e.run(&["verify", "--repair"]);
    assert!(
        !o.status.success(),
        "block 10 cannot be repaired from the live disk"
    );
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(
        out.contains("repaired: point p1 disk disk0 block 20"),
        "{out}"
    );
    assert!(
        out.contains("damaged: point p1 disk disk0 block 10"),
        "{out}"
    );
    assert!(
        !out.contains("damaged: point p1 disk disk0 block 20"),
        "{out}"
    );
    assert_same("p2", &e.restore("p2"), &m2);
    // The next backup of block 10's old bytes (written back) stores them again.
    e.write(&[(10 * BS as u64, m1[10 * BS..11 * BS].to_vec())]);
    e.ok(&["backup", "p3"]);
    assert!(e.ok(&["verify"]).contains("all good"));
    assert_same("p1", &e.restore("p1"), &m1);
    assert_same("p3", &e.restore("p3"), &e.model);
}
