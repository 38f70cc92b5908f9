use super::*;
use serde_json::{json, Value};

fn hub(cfg: HubConfig) -> Hub {
    Hub::new(cfg, Metrics::new())
}

fn pat(s: &str) -> Pattern {
    Pattern::parse(s).unwrap()
}

fn publish(h: &Hub, ch: &str, data: Value) -> u64 {
    h.publish(&Subject::parse(ch).unwrap(), data.to_string().into())
        .unwrap()
}

/// The JSON payloads queued for `c`, in order.
fn drain(h: &Hub, c: &Client) -> Vec<Value> {
    assert_eq!(c.closing().0, None);
    c.drain(&h.metrics)
        .iter()
        .map(|o| {
            let skip = match o.frame[1] {
                126 => 4,
                127 => 10,
                _ => 2,
            };
            serde_json::from_slice(&o.frame[skip..]).unwrap()
        })
        .collect()
}

#[test]
fn subscribers_get_the_snapshot_then_messages_in_sequence() {
    let h = hub(HubConfig::default());
    assert_eq!(
        publish(&h, "pricing.curves.EU-ETS.DEC26", json!({"mid": 70})),
        1
    );
    assert_eq!(
        publish(&h, "pricing.curves.EU-ETS.DEC26", json!({"mid": 71})),
        2
    );
    let c = h.client();
    h.subscribe(&c, None, &[pat("pricing.curves.EU-ETS.DEC26")], None);
    publish(&h, "pricing.curves.EU-ETS.DEC26", json!({"mid": 72}));
    publish(&h, "pricing.curves.CAISO.DEC26", json!({"mid": 1}));
    assert_eq!(
        drain(&h, &c),
        vec![
            json!({"type":"subscribed","epoch":&*h.epoch(),"channels":["pricing.curves.EU-ETS.DEC26"],
                   "snapshot":[{"channel":"pricing.curves.EU-ETS.DEC26","seq":2,"data":{"mid":71}}]}),
            json!({"type":"message","channel":"pricing.curves.EU-ETS.DEC26","seq":3,"data":{"mid":72}}),
        ]
    );
    assert_eq!(h.metrics.published.get(), 4);
    assert_eq!(h.metrics.subscriptions.get(), 1);
    assert_eq!(h.metrics.channels.get(), 2);
}

#[test]
fn wildcards_match_and_overlapping_subscriptions_deliver_once() {
    let h = hub(HubConfig::default());
    publish(&h, "a.b.c", json!(1));
    publish(&h, "a.x.c", json!(2));
    publish(&h, "z.b.c", json!(3));
    let c = h.client();
    h.subscribe(&c, None, &[pat("a.*.c"), pat("a.>"), pat("a.b.c")], None);
    let got = drain(&h, &c);
    let mut snap: Vec<String> = got[0]["snapshot"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["channel"].as_str().unwrap().to_string())
        .collect();
    snap.sort();
    assert_eq!(snap, ["a.b.c", "a.x.c"]);
    publish(&h, "a.b.c", json!(4));
    publish(&h, "a.q", json!(5));
    publish(&h, "z.b.c", json!(6));
    let got = drain(&h, &c);
    assert_eq!(
        got.iter().map(|m| m["data"].clone()).collect::<Vec<_>>(),
        vec![json!(4), json!(5)]
    );
    assert_eq!(h.metrics.subscriptions.get(), 3);
    h.unsubscribe(c.id, &[pat("a.>"), pat("a.b.c")]);
    assert_eq!(h.metrics.subscriptions.get(), 1);
    publish(&h, "a.q", json!(7));
    publish(&h, "a.b.c", json!(8));
    assert_eq!(drain(&h, &c).len(), 1);
    h.unsubscribe(c.id, &[pat("a.*.c")]);
    publish(&h, "a.b.c", json!(9));
    assert!(drain(&h, &c).is_empty());
    assert_eq!(h.metrics.subscriptions.get(), 0);
}

#[test]
fn the_snapshot_is_bounded() {
    let h = hub(HubConfig {
        max_snapshot: 3,
        ..HubConfig::default()
    });
    for i in 0..10 {
        publish(&h, &format!("s.{i}"), json!(i));
    }
    let c = h.client();
    h.subscribe(&c, None, &[pat("s.*")], None);
    assert_eq!(drain(&h, &c)[0]["snapshot"].as_array().unwrap().len(), 3);
}

#[test]
fn coalescing_keeps_the_newest_value_per_channel() {
    let h = hub(HubConfig {
        queue_capacity: 2,
        slow_policy: SlowPolicy::Coalesce,
        ..HubConfig::default()
    });
    let c = h.client();
    h.subscribe(&c, None, &[pat("p.*")], None);
    drain(&h, &c);
    // A client that keeps up loses nothing, even with messages waiting.
    publish(&h, "p.a", json!("x"));
    publish(&h, "p.a", json!("y"));
    assert_eq!(drain(&h, &c).len(), 2);
    // One whose socket is full gets the newest per channel.
    c.set_blocked(true);
    for i in 0..5 {
        publish(&h, "p.a", json!(i));
    }
    publish(&h, "p.b", json!("b"));
    publish(&h, "p.c", json!("c")); // full of distinct channels: p.a goes
    let got = drain(&h, &c);
    assert_eq!(
        got.iter()
            .map(|m| (m["channel"].clone(), m["seq"].clone()))
            .collect::<Vec<_>>(),
        vec![(json!("p.b"), json!(1)), (json!("p.c"), json!(1))]
    );
    assert_eq!(h.metrics.drops.coalesced.get(), 4);
    assert_eq!(h.metrics.drops.queue_full.get(), 1);
    assert_eq!(h.metrics.queued.get(), 0);
}

#[test]
fn drop_oldest_keeps_the_last_n() {
    let h = hub(HubConfig {
        queue_capacity: 3,
        slow_policy: SlowPolicy::DropOldest,
        ..HubConfig::default()
    });
    let c = h.client();
    h.subscribe(&c, None, &[pat("p.a")], None);
    drain(&h, &c);
    for i in 0..10 {
        publish(&h, "p.a", json!(i));
    }
    assert_eq!(c.queued(), 3);
    assert_eq!(h.metrics.queued.get(), 3);
    let got: Vec<Value> = drain(&h, &c).iter().map(|m| m["data"].clone()).collect();
    assert_eq!(got, vec![json!(7), json!(8), json!(9)]);
    assert_eq!(h.metrics.drops.queue_full.get(), 7);
}

#[test]
fn the_close_policy_disconnects_a_slow_client_and_spares_the_others() {
    let h = hub(HubConfig {
        queue_capacity: 4,
        slow_policy: SlowPolicy::Close,
        ..HubConfig::default()
    });
    let (slow, fast) = (h.client(), h.client());
    h.subscribe(&slow, None, &[pat("p.a")], None);
    h.subscribe(&fast, None, &[pat("p.a")], None);
    drain(&h, &slow);
    drain(&h, &fast);
    for i in 0..10 {
        publish(&h, "p.a", json!(i));
        assert_eq!(drain(&h, &fast).len(), 1);
    }
    assert_eq!(slow.closing().0, Some(SLOW_CONSUMER));
    let left = slow.drain(&h.metrics);
    assert_eq!(left.len(), 1);
    assert_eq!(
        &left[0].frame[..],
        &crate::ws::close_frame(1008, "slow consumer")[..]
    );
    assert_eq!(h.metrics.closes.slow_consumer.get(), 1);
    assert_eq!(h.metrics.drops.slow_consumer.get(), 4);
    assert_eq!(h.metrics.queued.get(), 0);
}

#[test]
fn since_replays_what_was_missed_within_the_history() {
    let h = hub(HubConfig {
        history_messages: 3,
        ..HubConfig::default()
    });
    for i in 1..=5 {
        publish(&h, "c.x", json!(i));
    }
    publish(&h, "c.y", json!("y"));
    let since = |seq: &[(&str, u64)]| Since {
        epoch: h.epoch().to_string(),
        seq: seq.iter().map(|(c, s)| (c.to_string(), *s)).collect(),
    };
    // Saw up to 3: 4 and 5 are in the history (3..=5).
    let c = h.client();
    h.subscribe(
        &c,
        None,
        &[pat("c.*")],
        Some(&since(&[("c.x", 3), ("c.y", 1)])),
    );
    let got = drain(&h, &c);
    assert_eq!(got[0]["recovered"], json!(true));
    assert_eq!(got[0]["snapshot"], json!([]));
    assert_eq!(
        got[1..]
            .iter()
            .map(|m| m["seq"].clone())
            .collect::<Vec<_>>(),
        vec![json!(4), json!(5)]
    );
    // Saw up to 1: 2 is gone, so no replay, the snapshot instead.
    for s in [
        since(&[("c.x", 1)]),
        since(&[("c.x", 9)]),     // from the future
        since(&[("other.x", 1)]), // not covered by the subscription
        Since {
            epoch: "old".into(),
            seq: [("c.x".to_string(), 4)].into(),
        },
    ] {
        let c = h.client();
        h.subscribe(&c, None, &[pat("c.*")], Some(&s));
        let got = drain(&h, &c);
        assert_eq!(got.len(), 1, "{s:?}");
        assert_eq!(got[0]["recovered"], json!(false));
        assert_eq!(got[0]["snapshot"].as_array().unwrap().len(), 2);
    }
}

#[tokio::test(start_paused = true)]
async fn history_expires() {
    let h = hub(HubConfig {
        history_ttl: Duration::from_secs(10),
        ..HubConfig::default()
    });
    publish(&h, "c.x", json!(1));
    tokio::time::advance(Duration::from_secs(11)).await;
    publish(&h, "c.x", json!(2));
    h.expire_history();
    let c = h.client();
    let since = Since {
        epoch: h.epoch().to_string(),
        seq: [("c.x".to_string(), 0)].into(),
    };
    h.subscribe(&c, None, &[pat("c.x")], Some(&since));
    assert_eq!(drain(&h, &c)[0]["recovered"], json!(false));
}

#[test]
fn new_channels_beyond_the_limit_are_refused() {
    let h = hub(HubConfig {
        max_channels: 2,
        ..HubConfig::default()
    });
    publish(&h, "a", json!(1));
    publish(&h, "b", json!(1));
    assert_eq!(
        h.publish(&Subject::parse("c").unwrap(), "1".into()),
        Err(PublishError::ChannelLimit(2))
    );
    assert_eq!(publish(&h, "a", json!(2)), 2);
    assert_eq!(h.metrics.channel_limit.get(), 1);
    assert_eq!(h.channel_count(), 2);
}
