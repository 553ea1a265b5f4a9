use super::*;

const PS: usize = 4096;

fn read(w: &Wal, page: u64) -> Option<Vec<u8>> {
    match w.lookup(page)? {
        (f, Loc::Data(off)) => {
            let mut b = vec![0u8; PS];
            f.read_exact_at(&mut b, off).unwrap();
            Some(b)
        }
        (_, Loc::Zero) => Some(vec![0u8; PS]),
    }
}

#[tokio::test]
async fn replay_applies_committed_records_and_cuts_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (w, _) = Wal::open(dir.path(), PS, 0).unwrap();
        w.write(1, &[1u8; 2 * PS]).unwrap();
        w.zero(2, 1).unwrap();
        w.flush().await.unwrap();
        w.write(5, &[5u8; PS]).unwrap(); // never flushed
    }
    let (w, report) = Wal::open(dir.path(), PS, 0).unwrap();
    assert_eq!(report.len(), 1);
    assert_eq!(report[0].1.records, 2);
    assert_eq!(report[0].1.dropped, HEADER_LEN + PS as u64);
    assert_eq!(read(&w, 1), Some(vec![1u8; PS]));
    assert_eq!(read(&w, 2), Some(vec![0u8; PS]));
    assert_eq!(read(&w, 5), None);
    // Two processes never share a buffer.
    let e = Wal::open(dir.path(), PS, 0).unwrap_err();
    assert!(e.to_string().contains("in use by another process"), "{e}");
}

#[tokio::test]
async fn a_corrupt_record_stops_replay_before_it() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (w, _) = Wal::open(dir.path(), PS, 0).unwrap();
        w.write(1, &[1u8; PS]).unwrap();
        w.flush().await.unwrap();
        w.write(2, &[2u8; PS]).unwrap();
        w.flush().await.unwrap();
    }
    // Flip a byte in the second record's payload.
    let path = gen_path(dir.path(), 1);
    let mut bytes = std::fs::read(&path).unwrap();
    let second = 2 * HEADER_LEN as usize + PS + 100;
    bytes[second + HEADER_LEN as usize] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let (w, _) = Wal::open(dir.path(), PS, 0).unwrap();
    assert_eq!(read(&w, 1), Some(vec![1u8; PS]));
    assert_eq!(read(&w, 2), None, "the corrupt record is not served");
}

/// A frozen generation's page need not be uploaded when a later generation has a newer
/// version that replay keeps whenever it keeps this one.
#[tokio::test]
async fn frozen_pages_rewritten_as_safely_since_are_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let (w, _) = Wal::open(dir.path(), PS, 0).unwrap();
    let live = |w: &Wal, g: u64| -> Vec<u64> {
        w.frozen_live(g)
            .unwrap()
            .1
            .iter()
            .map(|(p, _)| *p)
            .collect()
    };
    // Not on disk, rewritten but not committed: kept.
    w.write(1, &[1u8; PS]).unwrap();
    w.write(2, &[2u8; PS]).unwrap();
    let g = w.rotate().unwrap().unwrap();
    w.write(1, &[3u8; PS]).unwrap();
    assert_eq!(live(&w, g), vec![1, 2]);
    // Committed (no sync): replay after a crash of the process keeps it, as it would keep
    // the older one, which is not on disk either.
    w.commit().unwrap();
    assert_eq!(live(&w, g), vec![2]);
    // On disk, rewritten and committed but not on disk: kept until the rewrite is.
    w.flush().await.unwrap();
    let g2 = w.rotate().unwrap().unwrap();
    w.write(1, &[4u8; PS]).unwrap();
    w.commit().unwrap();
    assert_eq!(live(&w, g2), vec![1]);
    w.flush().await.unwrap();
    assert_eq!(live(&w, g2), Vec::<u64>::new());
    // Zeroing never counts as a rewrite (its place is not kept).
    w.write(5, &[5u8; PS]).unwrap();
    let g3 = w.rotate().unwrap().unwrap();
    w.zero(5, 1).unwrap();
    w.flush().await.unwrap();
    assert_eq!(
        live(&w, g3),
        vec![1, 5],
        "page 1 (written above) and page 5"
    );
}

#[tokio::test]
async fn rotate_and_retire() {
    let dir = tempfile::tempdir().unwrap();
    let (w, _) = Wal::open(dir.path(), PS, 0).unwrap();
    assert_eq!(w.rotate().unwrap(), None);
    w.write(7, &[7u8; PS]).unwrap();
    let g = w.rotate().unwrap().unwrap();
    w.write(7, &[8u8; PS]).unwrap();
    assert_eq!(
        read(&w, 7),
        Some(vec![8u8; PS]),
        "the newest generation wins"
    );
    let (_, pages) = w.frozen(g).unwrap();
    assert_eq!(pages.len(), 1);
    w.retire(g).unwrap();
    assert_eq!(w.frozen_ids(), Vec::<u64>::new());
    w.flush().await.unwrap();
    drop(w);
    // Reopening after generation 1 was checkpointed skips nothing newer.
    let (w, _) = Wal::open(dir.path(), PS, g).unwrap();
    assert_eq!(read(&w, 7), Some(vec![8u8; PS]));
}
