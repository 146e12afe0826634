//! Reference and market data: the names of assets and instruments, their parameters and their prices.
//! Every shard holds an identical copy (these events are broadcast), so validation against it is the same
//! everywhere and a broadcast event is accepted or rejected by all shards alike.

use std::cell::RefCell;
use std::collections::HashMap;

use foldhash::fast::RandomState;
use serde::{Deserialize, Serialize};

use vigil_model::event::{OptionMargin, Timestamp};
use vigil_model::portfolio::{OptionVector, RiskParams, option_vector, years_to_expiry};
use vigil_model::{Event, OptionTerms, Price, Rate, Reason, Rejection, Right, TierSpec, Tiers, reject};

/// Index of a named entity (the quote, an asset or an instrument); also its price slot.
pub type Slot = u32;

/// The quote is always slot 0, price 1, no haircut.
pub const QUOTE: Slot = 0;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum InstrumentKind {
    Perp,
    Future,
    Option { underlying: Slot, terms: OptionTerms },
}

impl InstrumentKind {
    fn name(&self) -> &'static str {
        match self {
            InstrumentKind::Perp => "perp",
            InstrumentKind::Future => "future",
            InstrumentKind::Option { .. } => "option",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Instrument {
    pub kind: InstrumentKind,
    /// Risk tiers of a perp or future; options carry their margin in `OptionTerms`.
    pub tiers: Option<Tiers>,
    pub settled: bool,
    /// The asset a perp or future follows (fixed at its first declaration), or an option's underlying: its
    /// portfolio-margin group.
    pub underlying: Option<Slot>,
    /// A future's or option's expiry.
    pub expiry: Option<Timestamp>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Entry {
    Quote,
    Asset { haircut: Rate },
    Instrument(Instrument),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Market {
    /// foldhash: several times faster than SipHash on short names, and randomly seeded against flooding.
    /// Derived from `entries` (rebuilt on restore).
    #[serde(skip)]
    names: HashMap<Box<str>, Slot, RandomState>,
    pub(crate) entries: Vec<(Box<str>, Entry)>,
    /// Mark price of an instrument or index price of an asset; `None` until the first `price` event.
    pub(crate) prices: Vec<Option<Price>>,
    /// The venue's time (the last `clock`); `None` until the first.
    pub(crate) clock: Option<Timestamp>,
    /// Portfolio parameters per underlying asset slot (`risk`); an underlying without an entry has the defaults.
    pub(crate) risk: Vec<(Slot, RiskParams)>,
    /// `max_liquidation_fee` (`liquidation_params`).
    max_liquidation_fee: Rate,
    /// Options' scenario vectors (derived: never persisted or printed).
    #[serde(skip)]
    pub(crate) vectors: RefCell<VectorCache>,
    /// Counts the changes to anything but prices (reference data, settlements, the clock, risk parameters): a
    /// figure cached at one epoch depends on nothing else that can have changed since but prices (derived).
    #[serde(skip)]
    epoch: u64,
}

/// What an option's scenario vector was computed from: it is a pure function of these.
#[derive(Clone, Copy, PartialEq)]
struct VectorKey {
    mark: Price,
    index: Price,
    clock: Timestamp,
    params: RiskParams,
}

/// Each option instrument's scenario vector (its implied volatility and the grid's repricings), computed once for
/// its current mark, index, clock and parameters and shared by every account holding it. Recomputed on first use
/// after any of those changed: a tick of an underlying costs one vector per option held, not one per account.
#[derive(Clone, Default)]
pub struct VectorCache {
    entries: Vec<Option<(VectorKey, OptionVector)>>,
}

impl std::fmt::Debug for VectorCache {
    /// Derived state that does not change what the engine computes: left out of the engine's debug form.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VectorCache")
    }
}

impl VectorCache {
    /// Brings option `slot`'s vector up to date; `None` when a figure it needs (mark, index, clock, expiry) is
    /// missing.
    pub fn refresh(&mut self, market: &Market, slot: Slot) -> Option<()> {
        let inst = market.instrument(slot)?;
        let InstrumentKind::Option { underlying, terms } = &inst.kind else { return None };
        let key = VectorKey {
            mark: market.price(slot)?,
            index: market.price(*underlying)?,
            clock: market.clock?,
            params: market.risk_params(*underlying),
        };
        let i = slot as usize;
        if self.entries.len() <= i {
            self.entries.resize(i + 1, None);
        }
        if self.entries[i].as_ref().is_some_and(|(k, _)| *k == key) {
            return Some(());
        }
        let t = years_to_expiry(key.clock, inst.expiry?);
        let vector = option_vector(&key.params, terms.right, terms.strike, t, key.index, key.mark);
        self.entries[i] = Some((key, vector));
        Some(())
    }

    /// Option `slot`'s vector as last refreshed.
    pub fn get(&self, slot: Slot) -> Option<&OptionVector> {
        self.entries.get(slot as usize).and_then(Option::as_ref).map(|(_, v)| v)
    }
}

/// What a reference-data event changed: the slot whose holders must be re-evaluated.
pub struct Declared {
    pub slot: Slot,
    pub created: bool,
}

impl Market {
    pub fn new(quote: &str) -> Self {
        let mut names = HashMap::default();
        names.insert(Box::from(quote), QUOTE);
        Self {
            names,
            entries: vec![(Box::from(quote), Entry::Quote)],
            prices: vec![Some(Price::ONE)],
            clock: None,
            risk: Vec::new(),
            max_liquidation_fee: vigil_model::liquidation::MAX_LIQUIDATION_FEE,
            vectors: RefCell::default(),
            epoch: 0,
        }
    }

    /// The number of changes to anything but prices so far (see the field).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Rebuilds the derived name index after deserialisation.
    pub fn reindex(&mut self) {
        self.epoch += 1;
        self.names = self.entries.iter().enumerate().map(|(i, (n, _))| (n.clone(), i as Slot)).collect();
    }

    pub fn slot(&self, name: &str) -> Option<Slot> {
        self.names.get(name).copied()
    }

    pub fn name(&self, slot: Slot) -> &str {
        self.entries.get(slot as usize).map_or("", |(n, _)| n)
    }

    pub fn entry(&self, slot: Slot) -> Option<&Entry> {
        self.entries.get(slot as usize).map(|(_, e)| e)
    }

    pub fn price(&self, slot: Slot) -> Option<Price> {
        self.prices.get(slot as usize).copied().flatten()
    }

    pub fn slots(&self) -> usize {
        self.entries.len()
    }

    pub fn instrument(&self, slot: Slot) -> Option<&Instrument> {
        match self.entry(slot) {
            Some(Entry::Instrument(i)) => Some(i),
            _ => None,
        }
    }

    /// An asset's slot (the quote included) by name: `unknown_asset` if never declared, `invalid_reference` if
    /// the name is an instrument's.
    pub fn asset(&self, name: &str) -> Result<Slot, Rejection> {
        match self.slot(name) {
            Some(s) if matches!(self.entry(s), Some(Entry::Quote | Entry::Asset { .. })) => Ok(s),
            Some(_) => Err(reject(Reason::InvalidReference, format!("{name:?} is an instrument, not an asset"))),
            None => Err(reject(Reason::UnknownAsset, format!("unknown asset {name:?}"))),
        }
    }

    /// An instrument's slot by name: `unknown_symbol` if never declared, `invalid_reference` if the name is an
    /// asset's.
    pub fn instrument_slot(&self, name: &str) -> Result<(Slot, &Instrument), Rejection> {
        match self.slot(name) {
            Some(s) => match self.entry(s) {
                Some(Entry::Instrument(i)) => Ok((s, i)),
                _ => Err(reject(Reason::InvalidReference, format!("{name:?} is an asset, not an instrument"))),
            },
            None => Err(reject(Reason::UnknownSymbol, format!("unknown symbol {name:?}"))),
        }
    }

    fn insert(&mut self, name: &str, entry: Entry) -> Slot {
        let slot = self.entries.len() as Slot;
        self.names.insert(Box::from(name), slot);
        self.entries.push((Box::from(name), entry));
        self.prices.push(None);
        slot
    }

    /// Applies a reference-data event (`asset`, `perp`, `future`, `option`), validated in the contract's order.
    pub fn declare(&mut self, event: &Event) -> Result<Declared, Rejection> {
        let declared = self.declare_inner(event);
        // A refused declaration changes nothing, not even the epoch.
        if declared.is_ok() {
            self.epoch += 1;
        }
        declared
    }

    fn declare_inner(&mut self, event: &Event) -> Result<Declared, Rejection> {
        match event {
            Event::Asset { asset, haircut } => self.declare_asset(asset, *haircut),
            Event::Perp { symbol, underlying, tiers } => {
                self.declare_linear(symbol, underlying.as_deref(), tiers, InstrumentKind::Perp, None)
            }
            Event::Future { symbol, underlying, tiers, expiry } => {
                let expiry = Timestamp::parse(expiry);
                self.declare_linear(symbol, underlying.as_deref(), tiers, InstrumentKind::Future, expiry)
            }
            Event::Option { symbol, underlying, right, strike, margin, expiry } => {
                self.declare_option(symbol, underlying, *right, *strike, margin, Timestamp::parse(expiry))
            }
            other => Err(reject(Reason::InvalidEvent, format!("`{}` is not reference data", other.type_name()))),
        }
    }

    fn declare_asset(&mut self, name: &str, haircut: Rate) -> Result<Declared, Rejection> {
        if haircut.0 < 0 || haircut >= Rate::ONE {
            return Err(reject(Reason::InvalidReference, "haircut must satisfy 0 <= haircut < 1"));
        }
        match self.slot(name) {
            None => Ok(Declared { slot: self.insert(name, Entry::Asset { haircut }), created: true }),
            Some(s) => match &mut self.entries[s as usize].1 {
                Entry::Asset { haircut: h } => {
                    *h = haircut;
                    Ok(Declared { slot: s, created: false })
                }
                Entry::Quote => Err(reject(Reason::InvalidReference, format!("{name:?} is the quote currency"))),
                Entry::Instrument(_) => {
                    Err(reject(Reason::InvalidReference, format!("{name:?} is already an instrument's symbol")))
                }
            },
        }
    }

    fn underlying_asset(&self, name: &str) -> Result<Slot, Rejection> {
        let s = self.asset(name)?;
        if s == QUOTE {
            return Err(reject(Reason::InvalidReference, "an underlying cannot be the quote currency"));
        }
        Ok(s)
    }

    /// Checks an existing symbol may be re-sent as `kind`; `Ok(None)` when it is new.
    fn existing(&self, name: &str, kind: &str) -> Result<Option<Slot>, Rejection> {
        let Some(s) = self.slot(name) else { return Ok(None) };
        match self.entry(s) {
            Some(Entry::Instrument(i)) if i.kind.name() == kind => {
                if i.settled {
                    Err(reject(Reason::InstrumentSettled, format!("{name:?} is settled")))
                } else {
                    Ok(Some(s))
                }
            }
            Some(Entry::Instrument(i)) => Err(reject(
                Reason::InvalidReference,
                format!("{name:?} is already a {}, cannot re-send it as a {kind}", i.kind.name()),
            )),
            _ => Err(reject(Reason::InvalidReference, format!("{name:?} collides with an asset name"))),
        }
    }

    fn declare_linear(
        &mut self,
        symbol: &str,
        underlying: Option<&str>,
        specs: &[TierSpec],
        kind: InstrumentKind,
        expiry: Option<Timestamp>,
    ) -> Result<Declared, Rejection> {
        let tiers = Tiers::new(specs)?;
        let underlying = match underlying {
            Some(u) => Some(self.underlying_asset(u)?),
            None => None,
        };
        match self.existing(symbol, kind.name())? {
            Some(s) => {
                if let Entry::Instrument(i) = &mut self.entries[s as usize].1 {
                    // v2: the underlying is fixed at the first declaration (it decides the portfolio group).
                    if underlying.is_some() && underlying != i.underlying {
                        return Err(reject(
                            Reason::InvalidReference,
                            format!("{symbol:?} cannot change its underlying (fixed at its first declaration)"),
                        ));
                    }
                    i.tiers = Some(tiers);
                    i.expiry = expiry.or(i.expiry);
                }
                Ok(Declared { slot: s, created: false })
            }
            None => {
                let instrument = Instrument { kind, tiers: Some(tiers), settled: false, underlying, expiry };
                let slot = self.insert(symbol, Entry::Instrument(instrument));
                Ok(Declared { slot, created: true })
            }
        }
    }

    fn declare_option(
        &mut self,
        symbol: &str,
        underlying: &str,
        right: Right,
        strike: Price,
        margin: &OptionMargin,
        expiry: Option<Timestamp>,
    ) -> Result<Declared, Rejection> {
        OptionTerms::validate(margin)?;
        let u = self.underlying_asset(underlying)?;
        let terms = OptionTerms { right, strike, margin: *margin };
        match self.existing(symbol, "option")? {
            Some(s) => {
                if let Entry::Instrument(Instrument {
                    kind: InstrumentKind::Option { underlying: old_u, terms: old },
                    ..
                }) = &mut self.entries[s as usize].1
                {
                    if *old_u != u || old.right != right || old.strike != strike {
                        return Err(reject(
                            Reason::InvalidReference,
                            format!("option {symbol:?} cannot change its underlying, right or strike"),
                        ));
                    }
                    old.margin = *margin;
                }
                Ok(Declared { slot: s, created: false })
            }
            None => {
                let kind = InstrumentKind::Option { underlying: u, terms };
                let instrument = Instrument { kind, tiers: None, settled: false, underlying: Some(u), expiry };
                let slot = self.insert(symbol, Entry::Instrument(instrument));
                Ok(Declared { slot, created: true })
            }
        }
    }

    /// Validates a `price` event and returns the slot it moves.
    pub fn price_slot(&self, symbol: &str) -> Result<Slot, Rejection> {
        let s = self.slot(symbol).ok_or_else(|| reject(Reason::UnknownSymbol, format!("unknown symbol {symbol:?}")))?;
        match self.entry(s) {
            Some(Entry::Quote) => Err(reject(Reason::InvalidReference, "the quote currency's price is fixed at 1")),
            Some(Entry::Instrument(i)) if i.settled => {
                Err(reject(Reason::InstrumentSettled, format!("{symbol:?} is settled")))
            }
            _ => Ok(s),
        }
    }

    pub fn set_price(&mut self, slot: Slot, price: Price) {
        if let Some(p) = self.prices.get_mut(slot as usize) {
            *p = Some(price);
        }
    }

    pub fn mark_settled(&mut self, slot: Slot, price: Price) {
        self.epoch += 1;
        self.set_price(slot, price);
        if let Some((_, Entry::Instrument(i))) = self.entries.get_mut(slot as usize) {
            i.settled = true;
        }
    }

    /// The venue's time, once a `clock` set it.
    pub fn clock(&self) -> Option<Timestamp> {
        self.clock
    }

    /// Validates a `clock` event: time never goes backwards.
    pub fn check_clock(&self, time: Timestamp) -> Result<(), Rejection> {
        match self.clock {
            Some(now) if time < now => {
                Err(reject(Reason::ClockRegression, format!("the clock is at {} ns, {} ns is earlier", now.0, time.0)))
            }
            _ => Ok(()),
        }
    }

    pub fn set_clock(&mut self, time: Timestamp) {
        self.epoch += 1;
        self.clock = Some(time);
    }

    /// Validates a `risk` event (names, then the parameters' bounds) and returns the underlying's slot.
    pub fn check_risk(&self, underlying: &str, params: &RiskParams) -> Result<Slot, Rejection> {
        let slot = self.underlying_asset(underlying)?;
        params.check().map_err(|e| reject(Reason::InvalidReference, e))?;
        Ok(slot)
    }

    pub fn set_risk(&mut self, slot: Slot, params: RiskParams) {
        self.epoch += 1;
        match self.risk.iter_mut().find(|(s, _)| *s == slot) {
            Some((_, p)) => *p = params,
            None => self.risk.push((slot, params)),
        }
    }

    /// The liquidation fee's cap, as a fraction of the closed notional.
    pub fn max_liquidation_fee(&self) -> Rate {
        self.max_liquidation_fee
    }

    pub fn set_max_liquidation_fee(&mut self, fee: Rate) {
        self.epoch += 1;
        self.max_liquidation_fee = fee;
    }

    /// The portfolio parameters of an underlying (the defaults until a `risk` event sets them).
    pub fn risk_params(&self, underlying: Slot) -> RiskParams {
        self.risk.iter().find(|(s, _)| *s == underlying).map_or_else(RiskParams::default, |(_, p)| *p)
    }

    /// The portfolio group of an instrument: its underlying, if it has one. Also the second slot a position in it
    /// depends on (an option's value and margin follow the index; any grouped position's portfolio figures do).
    pub fn group_of(&self, slot: Slot) -> Option<Slot> {
        self.instrument(slot).and_then(|i| i.underlying)
    }

    pub fn haircut(&self, slot: Slot) -> Rate {
        match self.entry(slot) {
            Some(Entry::Asset { haircut }) => *haircut,
            _ => Rate::ZERO,
        }
    }
}
