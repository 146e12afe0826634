//! Checkpoint deltas: a shard restored from the deltas it emitted (through the storage codec) continues exactly
//! like the shard that never stopped: same acceptance, triggers and state after every later event.

use std::collections::BTreeMap;

use proptest::prelude::*;
use vigil_engine::account::Account;
use vigil_engine::{Config, Delta, Detection, Engine};
use vigil_model::{Offset, Trigger, parse_line};
use vigil_store::codec::{decode_value, encode_value};
use vigil_testkit::{Rng, StreamConfig, generate};

fn check(seed: u64, detection: Detection) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let lines = generate(&StreamConfig {
        seed,
        events: 200 + rng.below(300) as usize,
        accounts: 2 + rng.below(8) as usize,
        bad_percent: 3,
        ..StreamConfig::default()
    });
    let config = Config { detection, ..Config::default() };
    let mut live = Engine::new(&config);
    // The "store": the latest version of every account, the latest market and offset.
    let mut store: BTreeMap<String, Account> = BTreeMap::new();
    let mut market = None;
    let mut store_offset = Offset(0);
    let restart_at = 1 + rng.below(lines.len() as u64) as usize;
    let mut restored: Option<Engine> = None;
    let (mut t1, mut t2): (Vec<Trigger>, Vec<Trigger>) = (Vec::new(), Vec::new());
    for (i, line) in lines.iter().enumerate() {
        let offset = Offset(i as u64 + 1);
        let Ok(event) = parse_line(line) else { continue };
        t1.clear();
        t2.clear();
        let r1 = live.apply(offset, &event, &mut t1);
        if let Some(other) = restored.as_mut() {
            let r2 = other.apply(offset, &event, &mut t2);
            if r1.as_ref().map_err(|r| r.reason) != r2.as_ref().map_err(|r| r.reason) || t1 != t2 {
                return Err(format!("offset {}: {line}\n live {r1:?} {t1:?}\n restored {r2:?} {t2:?}", offset.0));
            }
            if live.views() != other.views() {
                return Err(format!("offset {}: state differs after {line}", offset.0));
            }
        }
        // A delta now and then, through the codec, folded into the store.
        if rng.chance(15) || i + 1 == restart_at {
            let mut bytes = Vec::new();
            encode_value(&live.take_delta(), &mut bytes).map_err(|e| e.to_string())?;
            let delta: Delta = decode_value(&bytes).map_err(|e| e.to_string())?;
            store_offset = delta.offset;
            market = Some(delta.market);
            for acc in delta.accounts {
                store.insert(acc.id.to_string(), acc);
            }
        }
        if i + 1 == restart_at
            && let Some(m) = market.clone()
        {
            let engine = Engine::restore(&config, store_offset, m, store.values().cloned());
            if engine.views() != live.views() {
                return Err(format!("restored at offset {} differs from the live shard", store_offset.0));
            }
            restored = Some(engine);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn restored_shard_continues_like_the_live_one(seed in any::<u64>()) {
        // Proves deltas capture every change (dirty tracking), survive the codec, and restore exactly, in both
        // detection modes.
        for detection in [Detection::Indexed, Detection::Rescan] {
            if let Err(e) = check(seed, detection) {
                prop_assert!(false, "seed {seed} {detection:?}: {e}");
            }
        }
    }
}

#[test]
fn an_account_is_stored_in_the_format_it_always_had() {
    // Proves the in-memory layout (fields ordered for a stress pass's cache lines) leaves the stored form as it
    // was: an account is its id, balances, positions, episode and margin model in that order, and a position its
    // slot, quantity, cost, mode, wallet and episode; the cached figures are not stored.
    use vigil_engine::account::{Episode, Position};
    use vigil_model::{Amount, MarginMode, MarginModel, Qty};
    let mut account = Account::new("acct-7");
    account.balances[0].1 = Amount(123_456_789);
    account.balances.push((2, Amount(-42)));
    account.margin = MarginModel::Portfolio;
    account.episode = Episode { active: true, bankrupt: false };
    let mut cross = Position::new(3, MarginMode::Cross);
    cross.qty = Qty(-250_000_000);
    cross.cost_e16 = -7_500_000_000_000_000_000_000;
    cross.figures.value = Amount(99);
    let mut isolated = Position::new(4, MarginMode::Isolated);
    isolated.qty = Qty(1);
    isolated.cost_e16 = 31;
    isolated.wallet = Amount(5_000);
    isolated.episode = Episode { active: true, bankrupt: true };
    account.positions = vec![cross.clone(), isolated.clone()];
    let stored = |p: &Position| (p.slot, p.qty, p.cost_e16, p.mode, p.wallet, p.episode);
    let mut want = Vec::new();
    let fields =
        ("acct-7", account.balances.clone(), vec![stored(&cross), stored(&isolated)], account.episode, account.margin);
    encode_value(&fields, &mut want).expect("encodes");
    let mut got = Vec::new();
    encode_value(&account, &mut got).expect("encodes");
    assert_eq!(got, want);
    let back: Account = decode_value(&got).expect("decodes");
    assert_eq!(
        (&*back.id, &back.balances, back.episode, back.margin),
        ("acct-7", &account.balances, account.episode, account.margin)
    );
    let positions: Vec<_> = back.positions.iter().map(stored).collect();
    assert_eq!(positions, [stored(&cross), stored(&isolated)]);
    assert_eq!(back.positions[0].figures.value, Amount::ZERO, "figures are a cache, not stored");
}
