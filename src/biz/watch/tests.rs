//! The hub and the watch over an in-memory log.

use std::sync::Mutex;

use chrono::{TimeZone, Utc};

use super::*;
use crate::biz::{
    GpuType, InstanceId, InstanceSpec, InstanceStatus,
    instance::{Endpoint, Instance},
};

/// A log in memory: changes by position, a head and a horizon that tests move.
#[derive(Default)]
struct MemoryLog {
    changes: Mutex<Vec<Change>>,
    head: Mutex<i64>,
    horizon: Mutex<Option<Position>>,
    reads: Mutex<usize>,
    settles: Mutex<usize>,
}

/// The epoch of every [`MemoryLog`].
const EPOCH: i64 = 7;

/// Resuming at `position` of the memory log.
fn at(position: Position) -> Option<Resume> {
    Some(Resume { epoch: EPOCH, position })
}

impl MemoryLog {
    fn append(&self, tick: i64, changes: &[Change]) {
        self.changes.lock().unwrap().extend(changes.iter().cloned());
        *self.head.lock().unwrap() = tick;
    }

    fn prune_through(&self, tick: i64) {
        self.changes.lock().unwrap().retain(|c| c.position.tick > tick);
        *self.horizon.lock().unwrap() = Some(Position::end_of(tick));
    }
}

#[async_trait]
impl ChangeLog for MemoryLog {
    async fn bounds(&self) -> Result<Bounds, RepoError> {
        let horizon = self.horizon.lock().unwrap().unwrap_or(Position { tick: 0, seq: 0 });
        Ok(Bounds { horizon, head: *self.head.lock().unwrap(), epoch: EPOCH })
    }

    async fn settle(&self) -> Result<Bounds, RepoError> {
        *self.settles.lock().unwrap() += 1;
        tokio::time::sleep(Duration::from_millis(20)).await; // a round trip
        self.bounds().await
    }

    async fn after(
        &self,
        from: Position,
        through: i64,
        limit: u32,
    ) -> Result<(Vec<Change>, Position), RepoError> {
        *self.reads.lock().unwrap() += 1;
        let found = self
            .changes
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.position > from && c.position.tick <= through)
            .take(limit as usize)
            .cloned()
            .collect();
        Ok((found, self.bounds().await?.horizon))
    }
}

fn instance(id: i64, user: &str, status: InstanceStatus, version: i64) -> Instance {
    let at = Utc.timestamp_opt(1_700_000_000, 0).unwrap();
    Instance {
        id: InstanceId::try_from(id).unwrap(),
        user_id: user.into(),
        name: format!("n{id}"),
        status,
        status_reason: String::new(),
        spec: InstanceSpec {
            cpu: 1,
            memory_mb: 64,
            gpu: GpuType::None,
            image: "nginx".into(),
            config: serde_json::json!({}),
        },
        endpoint: Endpoint::default(),
        created_at: at,
        updated_at: at,
        deleted_at: None,
        version,
        labels: Default::default(),
    }
}

fn change(tick: i64, seq: i64, id: i64, user: &str, version: i64) -> Change {
    Change {
        position: Position { tick, seq },
        instance: instance(id, user, InstanceStatus::Running, version),
    }
}

fn conf() -> WatchConf {
    WatchConf { heartbeat: Duration::from_secs(5), ..WatchConf::default() }
}

fn setup() -> (Arc<MemoryLog>, Arc<WatchHub>, WatchUsecase, CancellationToken) {
    let log = Arc::new(MemoryLog::default());
    let stopping = CancellationToken::new();
    let hub = WatchHub::new(
        Bounds { horizon: Position { tick: 0, seq: 0 }, head: 0, epoch: EPOCH },
        stopping.clone(),
    );
    let uc = WatchUsecase::new(log.clone(), hub.clone(), conf());
    (log, hub, uc, stopping)
}

/// Writes a tick to the log and hands it to the hub, as the ticker does.
fn tick(log: &MemoryLog, hub: &WatchHub, tick: i64, changes: Vec<Change>) {
    log.append(tick, &changes);
    hub.publish(tick, changes);
}

async fn next_change(watch: &mut Watch) -> Arc<Change> {
    match tokio::time::timeout(Duration::from_secs(1), watch.next()).await {
        Ok(Ok(WatchItem::Change(c))) => c,
        other => panic!("expected a change, got {other:?}"),
    }
}

fn everyone() -> Interest {
    Interest::Matching(ListFilter::default())
}

#[tokio::test]
async fn a_watch_from_now_yields_later_ticks_in_position_order() {
    let (log, hub, uc, _) = setup();
    tick(&log, &hub, 1, vec![change(1, 1, 1, "u", 1)]);
    let mut watch = uc.watch(everyone(), None).await.unwrap();
    assert_eq!(watch.position(), Position::end_of(1), "from now: after tick 1");
    tick(&log, &hub, 2, vec![change(2, 5, 2, "u", 1), change(2, 7, 1, "u", 2)]);
    tick(&log, &hub, 3, vec![change(3, 6, 3, "u", 1)]);
    let got: Vec<(i64, i64)> = [
        next_change(&mut watch).await,
        next_change(&mut watch).await,
        next_change(&mut watch).await,
    ]
    .iter()
    .map(|c| (c.position.tick, c.position.seq))
    .collect();
    assert_eq!(got, [(2, 5), (2, 7), (3, 6)], "a late seq (6) comes with its later tick");
    assert_eq!(*log.reads.lock().unwrap(), 0, "served from the hub, not the log");
}

#[tokio::test]
async fn resuming_mid_tick_yields_the_rest_of_it_then_what_follows() {
    let (log, hub, uc, _) = setup();
    tick(&log, &hub, 1, vec![change(1, 1, 1, "u", 1), change(1, 2, 2, "u", 1)]);
    tick(&log, &hub, 2, vec![change(2, 3, 3, "u", 1)]);
    let mut watch = uc.watch(everyone(), at(Position { tick: 1, seq: 1 })).await.unwrap();
    assert_eq!(next_change(&mut watch).await.position, Position { tick: 1, seq: 2 });
    assert_eq!(next_change(&mut watch).await.position, Position { tick: 2, seq: 3 });
}

#[tokio::test]
async fn a_watch_behind_the_hubs_memory_reads_the_log_and_then_follows_the_hub() {
    let (log, hub, uc, _) = setup();
    // A jump (ticks the hub never saw, e.g. after a lost listener) forgets the memory.
    log.append(1, &[change(1, 1, 1, "u", 1)]);
    log.append(2, &[change(2, 2, 2, "u", 1)]);
    hub.publish(2, Vec::new());
    let mut watch = uc.watch(everyone(), at(Position { tick: 0, seq: 0 })).await.unwrap();
    assert_eq!(next_change(&mut watch).await.position.tick, 1);
    assert_eq!(next_change(&mut watch).await.position.tick, 2);
    assert!(*log.reads.lock().unwrap() >= 1);
    tick(&log, &hub, 3, vec![change(3, 3, 3, "u", 1)]);
    assert_eq!(next_change(&mut watch).await.position.tick, 3);
}

#[tokio::test]
async fn the_hub_keeps_a_bounded_memory_and_old_positions_fall_back_to_the_log() {
    let (log, hub, uc, _) = setup();
    let per_tick = 1000;
    let ticks = (RECENT_CHANGES / per_tick + 3) as i64;
    for t in 1..=ticks {
        let changes =
            (0..per_tick as i64).map(|i| change(t, t * 10_000 + i, i + 1, "u", t)).collect();
        tick(&log, &hub, t, changes);
    }
    assert!(hub.recent.lock().unwrap().len <= RECENT_CHANGES);
    assert!(hub.recent_after(Position { tick: 1, seq: 0 }, 10).is_none(), "forgotten");
    let mut watch = uc.watch(everyone(), at(Position { tick: 1, seq: 0 })).await.unwrap();
    let first = next_change(&mut watch).await;
    assert_eq!(first.position, Position { tick: 1, seq: 10_000 });
    assert_eq!(*log.reads.lock().unwrap(), 1);
}

#[tokio::test]
async fn interest_filters_by_owner_status_and_name_and_nothing_means_nothing() {
    let (log, hub, uc, _) = setup();
    let mut u1 = uc
        .watch(
            Interest::Matching(ListFilter { user_id: Some("u1".into()), ..ListFilter::default() }),
            None,
        )
        .await
        .unwrap();
    let mut nothing = uc.watch(Interest::Nothing, None).await.unwrap();
    let mut deleted = uc
        .watch(
            Interest::Matching(ListFilter {
                status: Some(InstanceStatus::Deleted),
                ..ListFilter::default()
            }),
            None,
        )
        .await
        .unwrap();
    let mut gone = change(1, 3, 3, "u2", 2);
    gone.instance.status = InstanceStatus::Deleted;
    tick(&log, &hub, 1, vec![change(1, 1, 1, "u2", 1), change(1, 2, 2, "u1", 1), gone]);
    assert_eq!(next_change(&mut u1).await.instance.user_id, "u1");
    assert_eq!(next_change(&mut deleted).await.instance.status, InstanceStatus::Deleted);
    tokio::time::pause();
    match nothing.next().await.unwrap() {
        WatchItem::Heartbeat(p) => assert_eq!(p, Position::end_of(1), "skipped, yet moved on"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn silence_is_broken_by_heartbeats_and_stopping_ends_the_watch() {
    let (_log, _hub, uc, stopping) = setup();
    let mut watch = uc.watch(everyone(), None).await.unwrap();
    let started = tokio::time::Instant::now();
    assert!(matches!(watch.next().await.unwrap(), WatchItem::Heartbeat(_)));
    assert_eq!(started.elapsed(), conf().heartbeat);
    stopping.cancel();
    let e = watch.next().await.unwrap_err();
    assert_eq!(e.reason(), "SERVICE_UNAVAILABLE");
}

#[tokio::test]
async fn tokens_behind_the_horizon_or_ahead_of_the_log_are_refused() {
    let (log, hub, uc, _) = setup();
    tick(&log, &hub, 1, vec![change(1, 1, 1, "u", 1)]);
    tick(&log, &hub, 2, vec![change(2, 2, 1, "u", 2)]);
    log.prune_through(1);
    hub.pruned_to(Position::end_of(1)); // as the ticker learns it
    let e = uc.watch(everyone(), at(Position { tick: 1, seq: 0 })).await.err().unwrap();
    assert_eq!(e.reason(), "RESUME_TOKEN_EXPIRED");
    assert!(uc.watch(everyone(), at(Position::end_of(1))).await.is_ok(), "nothing lost");
    // Ahead of the log: it was restored from before the token. The client lists again.
    let e = uc.watch(everyone(), at(Position { tick: 9, seq: 0 })).await.err().unwrap();
    assert_eq!(e.reason(), "RESUME_TOKEN_EXPIRED");
    assert!(e.to_string().contains("restored"), "{e}");

    // Pruned while a watch catches up from the log: it ends expired, skipping nothing.
    hub.publish(5, Vec::new()); // forget the memory
    let mut behind = uc.watch(everyone(), at(Position::end_of(1))).await.unwrap();
    log.prune_through(2);
    let e = behind.next().await.unwrap_err();
    assert_eq!(e.reason(), "RESUME_TOKEN_EXPIRED");
}

#[tokio::test]
async fn too_many_watches_are_refused_and_a_closed_one_frees_its_place() {
    let log = Arc::new(MemoryLog::default());
    let hub = WatchHub::new(
        Bounds { horizon: Position { tick: 0, seq: 0 }, head: 0, epoch: EPOCH },
        CancellationToken::new(),
    );
    let uc = WatchUsecase::new(log, hub.clone(), WatchConf { max_watchers: 2, ..conf() });
    let a = uc.watch(everyone(), None).await.unwrap();
    let _b = uc.watch(everyone(), None).await.unwrap();
    let e = uc.watch(everyone(), None).await.err().unwrap();
    assert_eq!(e.reason(), "SERVICE_UNAVAILABLE");
    drop(a);
    assert!(uc.watch(everyone(), None).await.is_ok());
    assert_eq!(hub.watchers.load(Ordering::Acquire), 1, "the refused and dropped ones left");
}

#[tokio::test]
async fn a_token_of_another_log_is_refused_and_one_ahead_of_the_hub_asks_the_log() {
    let (log, hub, uc, _) = setup();
    tick(&log, &hub, 1, vec![change(1, 1, 1, "u", 1)]);
    let foreign = Some(Resume { epoch: EPOCH + 1, position: Position::end_of(1) });
    let e = uc.watch(everyone(), foreign).await.err().unwrap();
    assert_eq!(e.reason(), "RESUME_TOKEN_EXPIRED", "{e}");
    assert!(e.to_string().contains("another change log"), "{e}");
    // Another replica handed out tick 2 that this hub has not heard of yet: the log says
    // the token is good, and the watch waits there.
    log.append(2, &[change(2, 2, 1, "u", 2)]);
    let mut ahead = uc.watch(everyone(), at(Position::end_of(2))).await.unwrap();
    assert_eq!(ahead.position(), Position::end_of(2));
    hub.publish(2, vec![change(2, 2, 1, "u", 2)]);
    tick(&log, &hub, 3, vec![change(3, 3, 1, "u", 3)]);
    assert_eq!(next_change(&mut ahead).await.position, Position { tick: 3, seq: 3 });
}

#[tokio::test]
async fn a_burst_of_watches_from_now_settles_the_log_once_or_twice() {
    let (log, _hub, uc, _) = setup();
    let uc = Arc::new(uc);
    let opens: Vec<_> = (0..200)
        .map(|_| {
            let uc = uc.clone();
            tokio::spawn(async move { uc.watch(everyone(), None).await.map(|w| w.position()) })
        })
        .collect();
    for open in opens {
        assert_eq!(open.await.unwrap().unwrap(), Position::end_of(0));
    }
    let settles = *log.settles.lock().unwrap();
    assert!((1..=3).contains(&settles), "{settles} settles for 200 opens");
    // A later open settles again: what committed since is behind it.
    log.append(1, &[change(1, 1, 1, "u", 1)]);
    assert_eq!(uc.watch(everyone(), None).await.unwrap().position(), Position::end_of(1));
    assert_eq!(*log.settles.lock().unwrap(), settles + 1);
}
