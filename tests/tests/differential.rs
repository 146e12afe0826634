//! The engine against the naive reference model, event by event, on random streams: same acceptance and reason,
//! same triggers, same state (every account view) after every event; and the same output for 1 and 7 shards.

use proptest::prelude::*;
use vigil_engine::{Config, Detection, Sharded};
use vigil_model::{MarginModel, Trigger, parse_line};
use vigil_testkit::compare::{first_difference, same_figures, same_liquidations, same_triggers};
use vigil_testkit::{Reference, StreamConfig, generate};
use vigil_tests::replay_text;

/// Replays `lines` through the engine (with `shards`) and the reference model, comparing after every event.
/// What a run exercised: triggers, rejections, pre-trade checks compared, events after which some account had a
/// portfolio group, and triggers of portfolio accounts.
#[derive(Default)]
struct Seen {
    fired: u64,
    rejected: u64,
    checked: u64,
    grouped: u64,
    portfolio_triggers: u64,
    /// Liquidation fills applied, those the fund paid for, and those it could not cover.
    liquidations: u64,
    deficits: u64,
    uncovered: u64,
}

fn differential(lines: &[String], shards: usize, detection: Detection) -> Result<Seen, String> {
    let mut engine = Sharded::new(&Config { detection, ..Config::default() }, shards);
    let mut reference = Reference::new(vigil_model::QUOTE_DEFAULT);
    let mut triggers: Vec<Trigger> = Vec::new();
    let mut seen = Seen::default();
    for line in lines {
        triggers.clear();
        match parse_line(line) {
            Err(_) => {
                let (a, b) = (engine.next_offset(), reference.skip());
                if a != b {
                    return Err(format!("offsets diverge at {line}"));
                }
                seen.rejected += 1;
            }
            Ok(event) => {
                if let vigil_model::Event::Trade(fill) = &event {
                    // The pre-trade check on the same fill, before it is applied, must agree too.
                    let got = engine.shard_for(&fill.account).check(&fill.account, fill);
                    let want = reference.check(fill);
                    match (&got, &want) {
                        (Ok(g), Ok((allowed, before, after))) => {
                            if g.allowed != *allowed
                                || !same_figures(&g.before, before)
                                || !same_figures(&g.after, after)
                            {
                                return Err(format!("check of {line}\n engine {g:?}\n reference {want:?}"));
                            }
                            seen.checked += 1;
                        }
                        (Err(g), Err(w)) if g.reason == w.reason => {}
                        _ => return Err(format!("check of {line}\n engine {got:?}\n reference {want:?}")),
                    }
                }
                let (offset, got) = engine.apply(&event, &mut triggers);
                let (ref_offset, want, want_triggers) = reference.apply(&event);
                if offset != ref_offset {
                    return Err(format!("offset {offset:?} vs {ref_offset:?}"));
                }
                let (g, w) = (got.as_ref().map_err(|r| r.reason), want.as_ref().map_err(|r| r.reason));
                if g != w {
                    return Err(format!("offset {}: {line}\n engine {got:?}\n reference {want:?}", offset.0));
                }
                if got.is_err() {
                    seen.rejected += 1;
                }
                if !same_triggers(&triggers, &want_triggers) {
                    return Err(format!(
                        "offset {}: {line}\n engine triggers {triggers:#?}\n reference {want_triggers:#?}",
                        offset.0
                    ));
                }
                seen.fired += triggers.len() as u64;
                let (fund, want_fund) = (engine.fund(), reference.fund());
                if (fund.balance, fund.fees, fund.paid, fund.uncovered)
                    != (want_fund.balance, want_fund.fees, want_fund.paid, want_fund.uncovered)
                {
                    return Err(format!("offset {}: {line}\n fund {fund:?}\n reference {want_fund:?}", offset.0));
                }
                let (ev, rv) = (engine.views(), reference.views());
                if let Some(diff) = first_difference(&ev, &rv) {
                    return Err(format!("offset {}: {line}\n state differs: {diff:#?}", offset.0));
                }
                seen.grouped += u64::from(ev.iter().any(|v| !v.groups.is_empty()));
                seen.portfolio_triggers += triggers
                    .iter()
                    .filter(|t| ev.iter().any(|v| v.account == t.account && v.margin == MarginModel::Portfolio))
                    .count() as u64;
            }
        }
    }
    if !same_liquidations(engine.liquidations(), reference.liquidations()) {
        return Err(format!(
            "liquidation records differ:\n engine {:#?}\n reference {:#?}",
            engine.liquidations(),
            reference.liquidations()
        ));
    }
    seen.liquidations = engine.liquidations().len() as u64;
    seen.deficits = engine.liquidations().iter().filter(|l| l.fund_paid.0 > 0).count() as u64;
    seen.uncovered = engine.liquidations().iter().filter(|l| l.uncovered.0 > 0).count() as u64;
    Ok(seen)
}

fn stream(seed: u64) -> Vec<String> {
    let mut rng = vigil_testkit::Rng::new(seed);
    let config = StreamConfig {
        seed,
        events: 100 + rng.below(300) as usize,
        accounts: 2 + rng.below(8) as usize,
        bad_percent: rng.below(8),
        // Half the streams carry contract v2 events (portfolio accounts, clocks, risk changes).
        portfolio_percent: if seed % 2 == 1 { 2 + rng.below(6) } else { 0 },
        // A third of the streams carry liquidation fills and fund events.
        liquidation_percent: if seed % 3 == 2 { 5 + rng.below(10) } else { 0 },
    };
    generate(&config)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("VIGIL_DIFF_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(500),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn engine_matches_reference_after_every_event(seed in any::<u64>()) {
        // Proves engine ≡ naive reference (acceptance, reason, triggers, full state, pre-trade checks) after every
        // event, with rescan and with price-indexed detection, 1 and 3 shards; portfolio figures within the
        // tolerance of `vigil_testkit::compare` (their option repricing is floating point, each side its own code).
        let lines = stream(seed);
        for (shards, detection) in [(1, Detection::Rescan), (1, Detection::Indexed), (3, Detection::Indexed)] {
            if let Err(e) = differential(&lines, shards, detection) {
                prop_assert!(false, "seed {seed}, {shards} shards, {detection:?}: {e}");
            }
        }
    }

    #[test]
    fn replay_is_identical_for_1_and_7_shards(seed in any::<u64>()) {
        // Proves `vigil replay --shards 1` and `--shards 7` print byte-identical documents.
        let input = stream(seed).join("\n");
        prop_assert_eq!(replay_text(&input, 1), replay_text(&input, 7));
    }
}

#[test]
fn random_streams_do_exercise_liquidations_and_rejections() {
    // Proves the generator is not vacuous: across 50 seeds, triggers fire, events are rejected, checks are compared,
    // portfolio accounts with groups are compared (and fire triggers) after many events, and liquidation fills land
    // above and below bankruptcy prices, some beyond what the fund holds.
    let mut all = Seen::default();
    for seed in 0..50 {
        let s = differential(&stream(seed), 1, Detection::Indexed).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        all.fired += s.fired;
        all.rejected += s.rejected;
        all.checked += s.checked;
        all.grouped += s.grouped;
        all.portfolio_triggers += s.portfolio_triggers;
        all.liquidations += s.liquidations;
        all.deficits += s.deficits;
        all.uncovered += s.uncovered;
    }
    let Seen { fired, rejected, checked, grouped, portfolio_triggers, liquidations, deficits, uncovered } = all;
    assert!(fired >= 20, "only {fired} triggers in 50 streams");
    assert!(rejected >= 50, "only {rejected} rejections in 50 streams");
    assert!(checked >= 500, "only {checked} pre-trade checks compared in 50 streams");
    // The v2 half of the streams: portfolio groups are evaluated after many events, and some fire triggers.
    assert!(grouped >= 500, "portfolio groups existed after only {grouped} events in 50 streams");
    assert!(portfolio_triggers >= 1, "no portfolio account fired a trigger in 50 streams");
    // The liquidation third: fills applied, some below their bankruptcy price, some beyond what the fund held.
    assert!(liquidations >= 10, "only {liquidations} liquidation fills in 50 streams");
    assert!(deficits >= 3 && uncovered >= 1, "{deficits} deficits and {uncovered} uncovered in 50 streams");
}
