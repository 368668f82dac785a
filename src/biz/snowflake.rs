//! Snowflake ids: 41 bits of milliseconds since 2024-01-01, 10 bits of node id and 12
//! bits of sequence. Ids from one generator grow strictly; generators with different
//! node ids never collide.

use std::sync::Mutex;

/// 2024-01-01T00:00:00Z in unix milliseconds.
pub const EPOCH_MS: i64 = 1_704_067_200_000;
const NODE_BITS: u32 = 10;
const SEQ_BITS: u32 = 12;
/// Largest node id.
pub const MAX_NODE: u16 = (1 << NODE_BITS) - 1;
const MAX_SEQ: i64 = (1 << SEQ_BITS) - 1;

/// A generator for one node.
pub struct Snowflake {
    node: i64,
    /// Last (milliseconds since epoch, sequence) handed out.
    last: Mutex<(i64, i64)>,
}

impl Snowflake {
    /// A generator for `node` (0..=1023).
    ///
    /// # Panics
    /// When `node` is above [`MAX_NODE`]; configuration validation rules that out.
    pub fn new(node: u16) -> Self {
        assert!(node <= MAX_NODE, "snowflake node id {node} is above {MAX_NODE}");
        Self { node: i64::from(node), last: Mutex::new((0, -1)) }
    }

    /// The next id, at the current wall-clock time.
    pub fn next_id(&self) -> i64 {
        self.next_at(|| chrono::Utc::now().timestamp_millis() - EPOCH_MS)
    }

    /// The next id with `now` as the clock (milliseconds since [`EPOCH_MS`]). When the
    /// clock goes backwards or the sequence of a millisecond runs out, the id is taken
    /// from the last millisecond used, moved forward: ids never repeat or shrink.
    pub fn next_at(&self, now: impl Fn() -> i64) -> i64 {
        let mut last = self.last.lock().expect("snowflake lock poisoned");
        let ms = now().max(last.0);
        let (ms, seq) = if ms == last.0 {
            if last.1 < MAX_SEQ { (ms, last.1 + 1) } else { (ms + 1, 0) }
        } else {
            (ms, 0)
        };
        *last = (ms, seq);
        (ms << (NODE_BITS + SEQ_BITS)) | (self.node << SEQ_BITS) | seq
    }
}

/// The node id encoded in `id`.
pub fn node_of(id: i64) -> u16 {
    ((id >> SEQ_BITS) & i64::from(MAX_NODE)) as u16
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn ids_grow_strictly_even_when_the_clock_stalls_or_goes_back() {
        let ids = Snowflake::new(7);
        let clock = [100, 100, 100, 99, 50, 101, 101, 200];
        let mut last = 0;
        for t in clock.iter().cycle().take(10_000) {
            let id = ids.next_at(|| *t);
            assert!(id > last, "{id} after {last}");
            last = id;
        }
    }

    #[test]
    fn a_millisecond_holds_4096_ids_then_borrows_the_next() {
        let generator = Snowflake::new(1);
        let ids: Vec<i64> = (0..4097).map(|_| generator.next_at(|| 10)).collect();

        assert_eq!(ids[4095] >> 22, 10);
        assert_eq!(ids[4096] >> 22, 11);
    }

    #[test]
    fn nodes_never_collide_and_are_recoverable() {
        let mut all = HashSet::new();
        for node in [0, 1, 512, MAX_NODE] {
            let ids = Snowflake::new(node);
            for _ in 0..1000 {
                let id = ids.next_at(|| 42);
                assert_eq!(node_of(id), node);
                assert!(all.insert(id));
            }
        }
    }

    #[test]
    fn ids_stay_positive_for_sixty_years() {
        let ids = Snowflake::new(MAX_NODE);
        let sixty_years_ms = 60 * 365 * 24 * 3600 * 1000;
        assert!(ids.next_at(|| sixty_years_ms) > 0);
    }
}
