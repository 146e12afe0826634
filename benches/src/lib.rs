//! Fixtures shared by the benchmarks: a shard with a given number of accounts and positions.

use vigil_engine::{Config, Detection, Engine};
use vigil_model::{Amount, Event, Fill, MarginMode, Offset, Price, Qty, Side, TierSpec, Trigger};

/// A shard under load: `accounts` accounts, each with a deposit and a position in one of `instruments` perps
/// (plus, for every account, a position in the shared `WIDE` perp when `wide` is set).
pub struct Fixture {
    pub engine: Engine,
    pub offset: u64,
    pub instruments: Vec<String>,
    pub accounts: usize,
    pub triggers: Vec<Trigger>,
}

fn tiers() -> Vec<TierSpec> {
    let p = |s: &str| Price::parse(s).expect("constant");
    let r = |s: &str| vigil_model::Rate::parse(s).expect("constant");
    vec![
        TierSpec { max_notional: Some(p("50000")), imr: r("0.02"), mmr: r("0.01") },
        TierSpec { max_notional: Some(p("250000")), imr: r("0.05"), mmr: r("0.025") },
        TierSpec { max_notional: None, imr: r("0.1"), mmr: r("0.05") },
    ]
}

impl Fixture {
    /// `accounts` accounts all holding a long 10 in the one-tier perp `WIDE` (IM 10%, MM 5%) at 100; `near_percent`
    /// of them with equity just above MM (52.6 against MM 50), the rest well collateralised (1 000).
    pub fn holders(accounts: usize, near_percent: usize, detection: Detection) -> Self {
        let mut f = Fixture {
            engine: Engine::new(&Config { detection, ..Config::default() }),
            offset: 0,
            instruments: vec!["WIDE".into()],
            accounts,
            triggers: Vec::new(),
        };
        let r = |s: &str| vigil_model::Rate::parse(s).expect("constant");
        let tiers = vec![TierSpec { max_notional: None, imr: r("0.1"), mmr: r("0.05") }];
        f.apply(&Event::Perp { symbol: "WIDE".into(), underlying: None, tiers });
        f.apply(&Event::Price { symbol: "WIDE".into(), price: Price::units(100) });
        let near_every = 100usize.checked_div(near_percent).unwrap_or(usize::MAX);
        for a in 0..accounts {
            let account = format!("acct-{a:07}");
            let amount = if a % near_every == 0 { Amount(5_260_000_000) } else { Amount::units(1000) };
            f.apply(&Event::Deposit { account: account.clone(), asset: "USDC".into(), amount });
            f.apply(&Event::Trade(fill(&account, "WIDE", true, 10)));
        }
        f
    }

    pub fn new(accounts: usize, instruments: usize, wide: bool) -> Self {
        let mut f = Fixture {
            engine: Engine::new(&Config::default()),
            offset: 0,
            instruments: (0..instruments).map(|i| format!("P{i}")).collect(),
            accounts,
            triggers: Vec::new(),
        };
        let mut symbols = f.instruments.clone();
        if wide {
            symbols.push("WIDE".into());
        }
        for s in &symbols {
            f.apply(&Event::Perp { symbol: s.clone(), underlying: None, tiers: tiers() });
            f.apply(&Event::Price { symbol: s.clone(), price: Price::units(100) });
        }
        for a in 0..accounts {
            let account = format!("acct-{a:07}");
            f.apply(&Event::Deposit { account: account.clone(), asset: "USDC".into(), amount: Amount::units(10_000) });
            let symbol = f.instruments[a % instruments].clone();
            f.apply(&Event::Trade(fill(&account, &symbol, a % 2 == 0, 10)));
            if wide {
                f.apply(&Event::Trade(fill(&account, "WIDE", a % 3 == 0, 5)));
            }
        }
        f
    }

    pub fn apply(&mut self, event: &Event) {
        self.offset += 1;
        self.triggers.clear();
        // Fixture events are valid by construction; a rejection here would make the bench measure nothing.
        if let Err(r) = self.engine.apply(Offset(self.offset), event, &mut self.triggers) {
            panic!("fixture event rejected: {r}");
        }
    }
}

/// A fill of `units` at 100.
pub fn fill(account: &str, symbol: &str, buy: bool, units: i64) -> Fill {
    Fill {
        account: account.into(),
        symbol: symbol.into(),
        side: if buy { Side::Buy } else { Side::Sell },
        qty: Qty::units(units),
        price: Price::units(100),
        fee: Amount::ZERO,
        margin_mode: MarginMode::Cross,
    }
}
