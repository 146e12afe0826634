//! Events of `events.md` and their JSON Lines form.
//!
//! Parsing checks an event in the contract's order: first its shape (a JSON object, a known `type`, exactly the
//! fields that type allows, each of the right JSON type and enum value), then its numbers. Names are checked
//! against state later, by whoever holds the state.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::num::{Amount, NumError, Price, Qty, Rate};
use crate::portfolio::{BUCKETS_MAX, RiskParams};
use crate::reject::{Reason, Rejection, reject};

/// Longest account id, symbol or asset name, in bytes.
pub const NAME_LEN_MAX: usize = 64;
/// Most tiers one instrument may have.
pub const TIERS_MAX: usize = 32;

/// A name as it appears in events: an account id, a symbol or an asset.
pub type Name = String;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Side {
    Buy,
    Sell,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Right {
    Call,
    Put,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MarginMode {
    #[default]
    Cross,
    Isolated,
}

impl MarginMode {
    pub const fn as_str(self) -> &'static str {
        match self {
            MarginMode::Cross => "cross",
            MarginMode::Isolated => "isolated",
        }
    }
}

/// An account's margin model (`account_config`, contract v2): every account starts `standard`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MarginModel {
    #[default]
    Standard,
    Portfolio,
}

impl MarginModel {
    pub const fn as_str(self) -> &'static str {
        match self {
            MarginModel::Standard => "standard",
            MarginModel::Portfolio => "portfolio",
        }
    }
}

/// An instant of the venue's time: nanoseconds since the Unix epoch, UTC (RFC 3339 in the stream). Exact for
/// every timestamp the contract accepts (years 0000 to 9999, up to nine fractional digits).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp(pub i128);

impl Timestamp {
    pub const NANOS_PER_SECOND: i128 = 1_000_000_000;
    /// The earliest timestamp the contract accepts, `0000-01-01T00:00:00Z`.
    pub const MIN: Timestamp = Timestamp(-62_167_219_200 * Self::NANOS_PER_SECOND);
    /// The latest, `9999-12-31T23:59:59.999999999Z`.
    pub const MAX: Timestamp = Timestamp(253_402_300_800 * Self::NANOS_PER_SECOND - 1);

    /// Parses an RFC 3339 timestamp with a zone (`Z` or `±HH:MM`); `None` for anything else, including a day
    /// the month does not have.
    pub fn parse(s: &str) -> Option<Timestamp> {
        if !is_rfc3339(s) {
            return None;
        }
        let b = s.as_bytes();
        let num = |r: std::ops::Range<usize>| b[r].iter().fold(0i64, |acc, x| acc * 10 + i64::from(x - b'0'));
        let (year, month, day) = (num(0..4), num(5..7), num(8..10));
        if day > days_in_month(year, month) {
            return None;
        }
        let secs_of_day = num(11..13) * 3600 + num(14..16) * 60 + num(17..19);
        let mut i = 19;
        let mut nanos: i128 = 0;
        if b[i] == b'.' {
            i += 1;
            let mut digits = 0;
            while i < b.len() && b[i].is_ascii_digit() {
                if digits < 9 {
                    nanos = nanos * 10 + i128::from(b[i] - b'0');
                    digits += 1;
                }
                i += 1;
            }
            for _ in digits..9 {
                nanos *= 10;
            }
        }
        let offset_secs = match b[i] {
            b'+' => num(i + 1..i + 3) * 3600 + num(i + 4..i + 6) * 60,
            b'-' => -(num(i + 1..i + 3) * 3600 + num(i + 4..i + 6) * 60),
            _ => 0,
        };
        let secs = days_from_civil(year, month, day) * 86_400 + secs_of_day - offset_secs;
        Some(Timestamp(i128::from(secs) * Self::NANOS_PER_SECOND + nanos))
    }
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// One tier as sent: `max_notional` is absent only for an unbounded last tier.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierSpec {
    pub max_notional: Option<Price>,
    pub imr: Rate,
    pub mmr: Rate,
}

/// Option margin parameters (`im_max`, `im_min`, `mm` as fractions of the underlying).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OptionMargin {
    pub im_max: Rate,
    pub im_min: Rate,
    pub mm: Rate,
}

impl Default for OptionMargin {
    fn default() -> Self {
        Self { im_max: Rate(15_000_000), im_min: Rate(10_000_000), mm: Rate(7_500_000) }
    }
}

/// An executed fill.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fill {
    pub account: Name,
    pub symbol: Name,
    pub side: Side,
    pub qty: Qty,
    pub price: Price,
    pub fee: Amount,
    pub margin_mode: MarginMode,
}

impl Fill {
    /// The fill's quantity signed by side (buy > 0).
    pub fn signed_qty(&self) -> Qty {
        match self.side {
            Side::Buy => self.qty,
            Side::Sell => Qty(-self.qty.0),
        }
    }
}

/// One event of the stream, as parsed (names unresolved).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    Asset {
        asset: Name,
        haircut: Rate,
    },
    Perp {
        symbol: Name,
        underlying: Option<Name>,
        tiers: Vec<TierSpec>,
    },
    Future {
        symbol: Name,
        underlying: Option<Name>,
        tiers: Vec<TierSpec>,
        expiry: String,
    },
    Option {
        symbol: Name,
        underlying: Name,
        right: Right,
        strike: Price,
        expiry: String,
        margin: OptionMargin,
    },
    Price {
        symbol: Name,
        price: Price,
    },
    Funding {
        symbol: Name,
        rate: Rate,
    },
    Settle {
        symbol: Name,
        price: Price,
    },
    Deposit {
        account: Name,
        asset: Name,
        amount: Amount,
    },
    Withdraw {
        account: Name,
        asset: Name,
        amount: Amount,
    },
    Transfer {
        account: Name,
        symbol: Name,
        amount: Amount,
    },
    Trade(Fill),
    // Contract v2, appended so that the encodings of the variants above do not change.
    /// The venue's time from this offset on.
    Clock {
        time: Timestamp,
    },
    /// The portfolio parameters of one underlying (an asset), replacing any earlier ones.
    Risk {
        underlying: Name,
        params: RiskParams,
    },
    /// An account's margin model from this offset on.
    AccountConfig {
        account: Name,
        margin: MarginModel,
    },
    /// A liquidation fill (`trade` with `liquidation: true`): the venue's liquidation engine closing (part of) the
    /// account's position (contract v2, `liquidation.md`).
    Liquidation(Fill),
    /// Money into (positive) or out of (negative) the insurance fund.
    Insurance {
        amount: Amount,
    },
    /// The liquidation parameters from this offset on.
    LiquidationParams {
        max_liquidation_fee: Rate,
    },
}

impl Event {
    /// The account an account event belongs to; `None` for reference and market data (broadcast to every shard).
    pub fn account(&self) -> Option<&str> {
        match self {
            Event::Deposit { account, .. }
            | Event::Withdraw { account, .. }
            | Event::Transfer { account, .. }
            | Event::Trade(Fill { account, .. })
            | Event::Liquidation(Fill { account, .. })
            | Event::AccountConfig { account, .. } => Some(account),
            _ => None,
        }
    }

    /// The `type` name of the event.
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::Asset { .. } => "asset",
            Event::Perp { .. } => "perp",
            Event::Future { .. } => "future",
            Event::Option { .. } => "option",
            Event::Price { .. } => "price",
            Event::Funding { .. } => "funding",
            Event::Settle { .. } => "settle",
            Event::Deposit { .. } => "deposit",
            Event::Withdraw { .. } => "withdraw",
            Event::Transfer { .. } => "transfer",
            Event::Trade(_) => "trade",
            Event::Clock { .. } => "clock",
            Event::Risk { .. } => "risk",
            Event::AccountConfig { .. } => "account_config",
            Event::Liquidation(_) => "trade",
            Event::Insurance { .. } => "insurance",
            Event::LiquidationParams { .. } => "liquidation_params",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Name,
    Number,
    Side,
    Right,
    Mode,
    Tiers,
    OptionMargin,
    Time,
    /// A JSON integer (not a string): `risk.buckets`.
    Integer,
    /// `standard` or `portfolio`.
    Model,
    /// A JSON boolean: `trade.liquidation`.
    Bool,
}

struct FieldSpec {
    name: &'static str,
    kind: Kind,
    required: bool,
}

const fn req(name: &'static str, kind: Kind) -> FieldSpec {
    FieldSpec { name, kind, required: true }
}
const fn opt(name: &'static str, kind: Kind) -> FieldSpec {
    FieldSpec { name, kind, required: false }
}

const TYPES: &[(&str, &[FieldSpec])] = &[
    ("asset", &[req("asset", Kind::Name), opt("haircut", Kind::Number)]),
    ("perp", &[req("symbol", Kind::Name), opt("underlying", Kind::Name), req("tiers", Kind::Tiers)]),
    (
        "future",
        &[
            req("symbol", Kind::Name),
            opt("underlying", Kind::Name),
            req("tiers", Kind::Tiers),
            req("expiry", Kind::Time),
        ],
    ),
    (
        "option",
        &[
            req("symbol", Kind::Name),
            req("underlying", Kind::Name),
            req("right", Kind::Right),
            req("strike", Kind::Number),
            req("expiry", Kind::Time),
            opt("margin", Kind::OptionMargin),
        ],
    ),
    ("price", &[req("symbol", Kind::Name), req("price", Kind::Number)]),
    ("funding", &[req("symbol", Kind::Name), req("rate", Kind::Number)]),
    ("settle", &[req("symbol", Kind::Name), req("price", Kind::Number)]),
    ("deposit", &[req("account", Kind::Name), req("asset", Kind::Name), req("amount", Kind::Number)]),
    ("withdraw", &[req("account", Kind::Name), req("asset", Kind::Name), req("amount", Kind::Number)]),
    ("transfer", &[req("account", Kind::Name), req("symbol", Kind::Name), req("amount", Kind::Number)]),
    ("clock", &[req("time", Kind::Time)]),
    (
        "risk",
        &[
            req("underlying", Kind::Name),
            opt("price_range", Kind::Number),
            opt("buckets", Kind::Integer),
            opt("vol_up", Kind::Number),
            opt("vol_down", Kind::Number),
            opt("min_vol_up", Kind::Number),
            opt("short_vega_power", Kind::Number),
            opt("long_vega_power", Kind::Number),
            opt("option_contingency", Kind::Number),
            opt("future_contingency", Kind::Number),
            opt("mm_factor", Kind::Number),
        ],
    ),
    ("account_config", &[req("account", Kind::Name), req("margin", Kind::Model)]),
    (
        "trade",
        &[
            req("account", Kind::Name),
            req("symbol", Kind::Name),
            req("side", Kind::Side),
            req("qty", Kind::Number),
            req("price", Kind::Number),
            opt("fee", Kind::Number),
            opt("margin_mode", Kind::Mode),
            opt("liquidation", Kind::Bool),
        ],
    ),
    ("insurance", &[req("amount", Kind::Number)]),
    ("liquidation_params", &[opt("max_liquidation_fee", Kind::Number)]),
];

fn shape_err(msg: String) -> Rejection {
    reject(Reason::InvalidEvent, msg)
}

/// A JSON value as the checks read it: borrowed from a parsed `Value`, or straight from the line (`Flat`), which
/// yields only the scalar kinds.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Val<'a> {
    Null,
    Bool(bool),
    /// A number's source text (`arbitrary_precision` keeps it as written).
    Num(&'a str),
    Str(&'a str),
    Array(&'a [Value]),
    Object(&'a Map<String, Value>),
}

impl<'a> From<&'a Value> for Val<'a> {
    fn from(v: &'a Value) -> Self {
        match v {
            Value::Null => Val::Null,
            Value::Bool(b) => Val::Bool(*b),
            Value::Number(n) => Val::Num(n.as_str()),
            Value::String(s) => Val::Str(s),
            Value::Array(a) => Val::Array(a),
            Value::Object(o) => Val::Object(o),
        }
    }
}

impl<'a> Val<'a> {
    fn json_type(self) -> &'static str {
        match self {
            Val::Null => "null",
            Val::Bool(_) => "a boolean",
            Val::Num(_) => "a number",
            Val::Str(_) => "a string",
            Val::Array(_) => "an array",
            Val::Object(_) => "an object",
        }
    }

    fn as_str(self) -> Option<&'a str> {
        match self {
            Val::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// An object's fields as the checks read them, in the order they are listed.
type FieldList<'a> = Vec<(&'a str, Val<'a>)>;

/// A JSON object's fields, in the map's (sorted) order.
fn map_fields(m: &Map<String, Value>) -> FieldList<'_> {
    m.iter().map(|(k, v)| (k.as_str(), Val::from(v))).collect()
}

fn check_enum(field: &str, v: Val<'_>, allowed: &[&str]) -> Result<(), Rejection> {
    match v {
        Val::Str(s) if allowed.contains(&s) => Ok(()),
        Val::Str(s) => Err(shape_err(format!("`{field}` must be one of {allowed:?}, got {s:?}"))),
        other => Err(shape_err(format!("`{field}` must be a string, got {}", other.json_type()))),
    }
}

fn check_number_shape(field: &str, v: Val<'_>) -> Result<(), Rejection> {
    match v {
        Val::Str(_) | Val::Num(_) => Ok(()),
        other => Err(shape_err(format!("`{field}` must be a decimal string or number, got {}", other.json_type()))),
    }
}

fn check_fields(ctx: &str, obj: &Map<String, Value>, specs: &[(&str, bool)]) -> Result<(), Rejection> {
    for key in obj.keys() {
        if !specs.iter().any(|(n, _)| n == key) {
            return Err(shape_err(format!("unknown field `{key}` in {ctx}")));
        }
    }
    for (name, required) in specs {
        if *required && obj.get(*name).is_none_or(Value::is_null) {
            return Err(shape_err(format!("missing field `{name}` in {ctx}")));
        }
    }
    Ok(())
}

/// An RFC 3339 timestamp: `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`, with plausible field ranges.
fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b.get(r.clone()).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let num = |r: std::ops::Range<usize>| {
        b.get(r).map(|d| d.iter().fold(0u32, |acc, x| acc * 10 + u32::from(x - b'0'))).unwrap_or(0)
    };
    if b.len() < 20
        || !digits(0..4)
        || b[4] != b'-'
        || !digits(5..7)
        || b[7] != b'-'
        || !digits(8..10)
        || !(b[10] == b'T' || b[10] == b't')
        || !digits(11..13)
        || b[13] != b':'
        || !digits(14..16)
        || b[16] != b':'
        || !digits(17..19)
    {
        return false;
    }
    if !(1..=12).contains(&num(5..7)) || !(1..=31).contains(&num(8..10)) || num(11..13) > 23 || num(14..16) > 59 {
        return false;
    }
    if num(17..19) > 60 {
        return false;
    }
    let mut i = 19;
    if b[i] == b'.' {
        i += 1;
        let s = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == s {
            return false;
        }
    }
    match &b[i..] {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => {
            [h1, h2, m1, m2].iter().all(|d| d.is_ascii_digit())
                && (h1 - b'0') * 10 + (h2 - b'0') <= 23
                && (m1 - b'0') * 10 + (m2 - b'0') <= 59
        }
        _ => false,
    }
}

fn check_shape(field: &FieldSpec, v: Val<'_>) -> Result<(), Rejection> {
    let name = field.name;
    match field.kind {
        Kind::Name => match v {
            Val::Str("") => Err(shape_err(format!("`{name}` must not be empty"))),
            Val::Str(s) if s.len() > NAME_LEN_MAX => {
                Err(shape_err(format!("`{name}` is longer than {NAME_LEN_MAX} bytes")))
            }
            Val::Str(s) if s.chars().any(char::is_control) => {
                Err(shape_err(format!("`{name}` contains a control character")))
            }
            Val::Str(_) => Ok(()),
            other => Err(shape_err(format!("`{name}` must be a string, got {}", other.json_type()))),
        },
        Kind::Number => check_number_shape(name, v),
        Kind::Side => check_enum(name, v, &["buy", "sell"]),
        Kind::Right => check_enum(name, v, &["call", "put"]),
        Kind::Mode => check_enum(name, v, &["cross", "isolated"]),
        Kind::Model => check_enum(name, v, &["standard", "portfolio"]),
        Kind::Bool => match v {
            Val::Bool(_) => Ok(()),
            other => Err(shape_err(format!("`{name}` must be true or false, got {}", other.json_type()))),
        },
        Kind::Integer => match v {
            Val::Num(n) if bucket_count(n).is_some_and(|b| (1..=BUCKETS_MAX).contains(&b)) => Ok(()),
            Val::Num(n) => Err(shape_err(format!("`{name}` must be an integer from 1 to {BUCKETS_MAX}, got {n}"))),
            other => Err(shape_err(format!("`{name}` must be a JSON integer, got {}", other.json_type()))),
        },
        Kind::Time => match v {
            Val::Str(s) if Timestamp::parse(s).is_some() => Ok(()),
            Val::Str(s) => Err(shape_err(format!("`{name}` must be an RFC 3339 timestamp, got {s:?}"))),
            other => Err(shape_err(format!("`{name}` must be a string, got {}", other.json_type()))),
        },
        Kind::Tiers => {
            let Val::Array(tiers) = v else {
                return Err(shape_err(format!("`{name}` must be an array, got {}", v.json_type())));
            };
            if tiers.is_empty() {
                return Err(shape_err("`tiers` must hold at least one tier".into()));
            }
            if tiers.len() > TIERS_MAX {
                return Err(shape_err(format!("`tiers` holds more than {TIERS_MAX} tiers")));
            }
            for (i, t) in tiers.iter().enumerate() {
                let Value::Object(t) = t else {
                    return Err(shape_err(format!("tier {i} must be an object, got {}", Val::from(t).json_type())));
                };
                let ctx = format!("tier {i}");
                check_fields(&ctx, t, &[("max_notional", false), ("imr", true), ("mmr", true)])?;
                for (k, x) in t {
                    if !x.is_null() {
                        check_number_shape(&format!("{ctx}.{k}"), x.into())?;
                    }
                }
            }
            Ok(())
        }
        Kind::OptionMargin => {
            let Val::Object(m) = v else {
                return Err(shape_err(format!("`{name}` must be an object, got {}", v.json_type())));
            };
            check_fields("`margin`", m, &[("im_max", false), ("im_min", false), ("mm", false)])?;
            for (k, x) in m {
                if !x.is_null() {
                    check_number_shape(&format!("margin.{k}"), x.into())?;
                }
            }
            Ok(())
        }
    }
}

/// `risk.buckets` as a JSON integer's text (what `serde_json::Number::as_u64` reads, with its source text kept).
fn bucket_count(text: &str) -> Option<u32> {
    text.parse::<u64>().ok().and_then(|b| u32::try_from(b).ok())
}

fn num_text(v: Val<'_>) -> &str {
    match v {
        Val::Str(s) | Val::Num(s) => s,
        _ => "",
    }
}

/// The numeric constraint of one field.
#[derive(Clone, Copy)]
enum Bound {
    Any,
    Positive,
    NonZero,
    /// Within [-1, 1]: a funding rate (100% of notional per payment at most).
    Unit,
    /// Within [0, 1]: a fraction (`max_liquidation_fee`).
    Fraction,
}

fn number(field: &str, v: Val<'_>, bound: Bound) -> Result<i64, Rejection> {
    let text = num_text(v);
    let raw = Rate::parse(text).map_err(|e| {
        let shown: String = text.chars().take(40).collect();
        reject(Reason::InvalidNumber, format!("`{field}` = {shown:?}: {e}"))
    })?;
    match bound {
        Bound::Positive if raw.0 <= 0 => Err(reject(Reason::InvalidNumber, format!("`{field}` must be > 0"))),
        Bound::NonZero if raw.0 == 0 => Err(reject(Reason::InvalidNumber, format!("`{field}` must not be 0"))),
        Bound::Unit if raw.0.abs() > Rate::ONE.0 => {
            Err(reject(Reason::InvalidNumber, format!("`{field}` must be between -1 and 1")))
        }
        Bound::Fraction if !(0..=Rate::ONE.0).contains(&raw.0) => {
            Err(reject(Reason::InvalidNumber, format!("`{field}` must be between 0 and 1")))
        }
        _ => Ok(raw.0),
    }
}

/// An object's fields, looked up by name; `null` reads as absent.
struct Fields<'a, 'b>(&'b [(&'a str, Val<'a>)]);

impl<'a> Fields<'a, '_> {
    fn get(&self, k: &str) -> Option<Val<'a>> {
        self.0.iter().find(|(n, _)| *n == k).map(|(_, v)| *v).filter(|v| !matches!(v, Val::Null))
    }
    fn name(&self, k: &str) -> Name {
        self.get(k).and_then(Val::as_str).unwrap_or_default().to_owned()
    }
    fn opt_name(&self, k: &str) -> Option<Name> {
        self.get(k).and_then(Val::as_str).map(str::to_owned)
    }
    fn text(&self, k: &str) -> &'a str {
        self.get(k).and_then(Val::as_str).unwrap_or_default()
    }
    fn num(&self, k: &str, bound: Bound) -> Result<i64, Rejection> {
        match self.get(k) {
            Some(v) => number(k, v, bound),
            None => Ok(0),
        }
    }
}

fn tiers(v: Option<Val<'_>>) -> Result<Vec<TierSpec>, Rejection> {
    let mut out = Vec::new();
    let list = match v {
        Some(Val::Array(list)) => list,
        _ => &[],
    };
    for (i, t) in list.iter().enumerate() {
        let fields = map_fields(t.as_object().ok_or_else(|| shape_err(format!("tier {i} must be an object")))?);
        let f = Fields(&fields);
        let max_notional = match f.get("max_notional") {
            Some(v) => Some(Price(number(&format!("tier {i}.max_notional"), v, Bound::Positive)?)),
            None => None,
        };
        let imr = Rate(number(&format!("tier {i}.imr"), f.get("imr").unwrap_or(Val::Null), Bound::Any)?);
        let mmr = Rate(number(&format!("tier {i}.mmr"), f.get("mmr").unwrap_or(Val::Null), Bound::Any)?);
        out.push(TierSpec { max_notional, imr, mmr });
    }
    Ok(out)
}

fn option_margin(v: Option<Val<'_>>) -> Result<OptionMargin, Rejection> {
    let mut m = OptionMargin::default();
    if let Some(Val::Object(obj)) = v {
        let fields = map_fields(obj);
        let f = Fields(&fields);
        if let Some(x) = f.get("im_max") {
            m.im_max = Rate(number("margin.im_max", x, Bound::Any)?);
        }
        if let Some(x) = f.get("im_min") {
            m.im_min = Rate(number("margin.im_min", x, Bound::Any)?);
        }
        if let Some(x) = f.get("mm") {
            m.mm = Rate(number("margin.mm", x, Bound::Any)?);
        }
    }
    Ok(m)
}

fn side(s: &str) -> Side {
    if s == "sell" { Side::Sell } else { Side::Buy }
}

/// Parses one JSON Lines line into an event, or the rejection the contract gives it.
///
/// Most lines are flat objects of strings and numbers; those are read in place (`flat`), without building a
/// `serde_json::Value`. Only the fast path's acceptances are kept: a line it refuses to read, or one the checks
/// reject, is read again by the full parser, whose messages are the contract's (which unknown field is named first,
/// say, follows the parsed map's order). The two readings agree on every line the fast path accepts (a property
/// test holds them to it).
pub fn parse_line(line: &str) -> Result<Event, Rejection> {
    let mut fields = [("", Val::Null); FLAT_FIELDS_MAX];
    if let Some(n) = read_flat(line, &mut fields)
        && let Ok(event) = parse_fields(&fields[..n])
    {
        return Ok(event);
    }
    parse_line_full(line)
}

/// A pre-trade check read in place: a flat JSON object of a trade's fields without `type`, its `account` given or
/// inside it (`account: None`), as the fill it would be. `None` when the fast path does not read it, it names `type`
/// (or `account` when one is given), or the checks reject it: the caller then reads it the full way, for the
/// answer (and the message) the contract gives. Whatever it returns, the full way returns too.
pub fn parse_flat_trade(text: &str, account: Option<&str>) -> Option<Fill> {
    let mut fields = [("", Val::Null); FLAT_FIELDS_MAX];
    let mut n = read_flat(text, &mut fields)?;
    let named = |k: &str| fields[..n].iter().any(|(f, _)| *f == k);
    if named("type") || (account.is_some() && named("account")) || n + 2 > FLAT_FIELDS_MAX {
        return None;
    }
    fields[n] = ("type", Val::Str("trade"));
    n += 1;
    if let Some(a) = account {
        fields[n] = ("account", Val::Str(a));
        n += 1;
    }
    match parse_fields(&fields[..n]) {
        Ok(Event::Trade(fill)) => Some(fill),
        _ => None,
    }
}

/// `parse_line` without the fast path: serde_json's `Value`, then the checks.
pub fn parse_line_full(line: &str) -> Result<Event, Rejection> {
    let value: Value = serde_json::from_str(line).map_err(|e| shape_err(format!("malformed JSON: {e}")))?;
    parse_value(&value)
}

/// Parses one JSON value into an event, or the rejection the contract gives it.
pub fn parse_value(value: &Value) -> Result<Event, Rejection> {
    let Value::Object(obj) = value else {
        return Err(shape_err(format!("an event must be a JSON object, got {}", Val::from(value).json_type())));
    };
    parse_fields(&map_fields(obj))
}

/// The checks and the event of one object's fields (`type` among them), in the contract's order: the type, the
/// shape (exactly the allowed fields, each present when required and of the right JSON type), then the numbers
/// in field order. An unknown field is reported in `obj`'s order.
fn parse_fields(obj: &[(&str, Val<'_>)]) -> Result<Event, Rejection> {
    let f = Fields(obj);
    let ty = match obj.iter().find(|(k, _)| *k == "type") {
        Some((_, Val::Str(s))) => *s,
        Some((_, other)) => return Err(shape_err(format!("`type` must be a string, got {}", other.json_type()))),
        None => return Err(shape_err("missing field `type`".into())),
    };
    let Some((_, specs)) = TYPES.iter().find(|(n, _)| *n == ty) else {
        let shown: String = ty.chars().take(40).collect();
        return Err(shape_err(format!("unknown event type {shown:?}")));
    };
    for (key, _) in obj {
        if *key != "type" && !specs.iter().any(|s| s.name == *key) {
            let shown: String = key.chars().take(40).collect();
            return Err(shape_err(format!("unknown field `{shown}` in a `{ty}` event")));
        }
    }
    for spec in specs.iter() {
        match f.get(spec.name) {
            Some(v) => check_shape(spec, v)?,
            None if spec.required => {
                return Err(shape_err(format!("missing field `{}` in a `{ty}` event", spec.name)));
            }
            None => {}
        }
    }
    // Numbers, in field order.
    Ok(match ty {
        "asset" => Event::Asset { asset: f.name("asset"), haircut: Rate(f.num("haircut", Bound::Any)?) },
        "perp" => Event::Perp {
            symbol: f.name("symbol"),
            underlying: f.opt_name("underlying"),
            tiers: tiers(f.get("tiers"))?,
        },
        "future" => Event::Future {
            symbol: f.name("symbol"),
            underlying: f.opt_name("underlying"),
            tiers: tiers(f.get("tiers"))?,
            expiry: f.text("expiry").to_owned(),
        },
        "option" => Event::Option {
            symbol: f.name("symbol"),
            underlying: f.name("underlying"),
            right: if f.text("right") == "put" { Right::Put } else { Right::Call },
            strike: Price(f.num("strike", Bound::Positive)?),
            expiry: f.text("expiry").to_owned(),
            margin: option_margin(f.get("margin"))?,
        },
        "price" => Event::Price { symbol: f.name("symbol"), price: Price(f.num("price", Bound::Positive)?) },
        "funding" => Event::Funding { symbol: f.name("symbol"), rate: Rate(f.num("rate", Bound::Unit)?) },
        "settle" => Event::Settle { symbol: f.name("symbol"), price: Price(f.num("price", Bound::Positive)?) },
        "deposit" => Event::Deposit {
            account: f.name("account"),
            asset: f.name("asset"),
            amount: Amount(i128::from(f.num("amount", Bound::Positive)?)),
        },
        "withdraw" => Event::Withdraw {
            account: f.name("account"),
            asset: f.name("asset"),
            amount: Amount(i128::from(f.num("amount", Bound::Positive)?)),
        },
        "transfer" => Event::Transfer {
            account: f.name("account"),
            symbol: f.name("symbol"),
            amount: Amount(i128::from(f.num("amount", Bound::NonZero)?)),
        },
        "clock" => Event::Clock { time: Timestamp::parse(f.text("time")).unwrap_or_default() },
        "risk" => {
            let d = RiskParams::default();
            let rate = |k: &str, default: Rate| -> Result<Rate, Rejection> {
                Ok(match f.get(k) {
                    Some(v) => Rate(number(k, v, Bound::Any)?),
                    None => default,
                })
            };
            Event::Risk {
                underlying: f.name("underlying"),
                params: RiskParams {
                    price_range: rate("price_range", d.price_range)?,
                    buckets: f.get("buckets").map(num_text).and_then(bucket_count).unwrap_or(d.buckets),
                    vol_up: rate("vol_up", d.vol_up)?,
                    vol_down: rate("vol_down", d.vol_down)?,
                    min_vol_up: rate("min_vol_up", d.min_vol_up)?,
                    short_vega_power: rate("short_vega_power", d.short_vega_power)?,
                    long_vega_power: rate("long_vega_power", d.long_vega_power)?,
                    option_contingency: rate("option_contingency", d.option_contingency)?,
                    future_contingency: rate("future_contingency", d.future_contingency)?,
                    mm_factor: rate("mm_factor", d.mm_factor)?,
                },
            }
        }
        "insurance" => Event::Insurance { amount: Amount(i128::from(f.num("amount", Bound::NonZero)?)) },
        "liquidation_params" => Event::LiquidationParams {
            max_liquidation_fee: match f.get("max_liquidation_fee") {
                Some(v) => Rate(number("max_liquidation_fee", v, Bound::Fraction)?),
                None => crate::liquidation::MAX_LIQUIDATION_FEE,
            },
        },
        "account_config" => Event::AccountConfig {
            account: f.name("account"),
            margin: if f.text("margin") == "portfolio" { MarginModel::Portfolio } else { MarginModel::Standard },
        },
        _ => {
            // "trade": the table holds no other type.
            let qty = Qty(f.num("qty", Bound::Positive)?);
            let price = Price(f.num("price", Bound::Positive)?);
            let fee = Amount(i128::from(f.num("fee", Bound::Any)?));
            let fill = Fill {
                account: f.name("account"),
                symbol: f.name("symbol"),
                side: side(f.text("side")),
                qty,
                price,
                fee,
                margin_mode: if f.text("margin_mode") == "isolated" { MarginMode::Isolated } else { MarginMode::Cross },
            };
            if matches!(f.get("liquidation"), Some(Val::Bool(true))) {
                Event::Liquidation(fill)
            } else {
                Event::Trade(fill)
            }
        }
    })
}

/// Most fields an object read in place may have (`risk` has twelve, `type` included).
const FLAT_FIELDS_MAX: usize = 16;

/// Reads a flat JSON object in place into `fields`: scalar values only, strings without escapes or control
/// characters, no repeated field, at most `FLAT_FIELDS_MAX` fields. Returns how many fields it holds, or `None` for
/// a line outside that subset (the full parser then reads it). The subset's grammar is a subset of JSON's, so a line
/// it reads parses to the same fields with serde_json (in another order: a `Map` sorts its keys).
fn read_flat<'a>(line: &'a str, fields: &mut [(&'a str, Val<'a>); FLAT_FIELDS_MAX]) -> Option<usize> {
    let b = line.as_bytes();
    let mut len = 0;
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        i += 1;
    } else {
        loop {
            let (key, next) = flat_string(line, i)?;
            i = skip_ws(b, next);
            if b.get(i) != Some(&b':') {
                return None;
            }
            let (value, next) = flat_scalar(line, skip_ws(b, i + 1))?;
            if len == FLAT_FIELDS_MAX || fields[..len].iter().any(|(k, _)| *k == key) {
                return None;
            }
            fields[len] = (key, value);
            len += 1;
            i = skip_ws(b, next);
            match b.get(i) {
                Some(b',') => i = skip_ws(b, i + 1),
                Some(b'}') => {
                    i += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    (skip_ws(b, i) == b.len()).then_some(len)
}

/// The index of the first byte at or after `i` that is not JSON whitespace.
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// A string opening at `i` with no escape or control character: its contents and the index after it.
fn flat_string(line: &str, i: usize) -> Option<(&str, usize)> {
    let b = line.as_bytes();
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let start = i + 1;
    let len = b.get(start..)?.iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20)?;
    let end = start + len;
    if b.get(end) != Some(&b'"') {
        return None;
    }
    Some((line.get(start..end)?, end + 1))
}

/// A scalar value starting at `i` (a string as `flat_string` reads it, a number, `true`, `false`, `null`) and
/// the index after it.
fn flat_scalar(line: &str, i: usize) -> Option<(Val<'_>, usize)> {
    let b = line.as_bytes();
    let word = |w: &[u8], v: Val<'static>| b.get(i..i + w.len()).filter(|x| *x == w).map(|_| (v, i + w.len()));
    match b.get(i)? {
        b'"' => flat_string(line, i).map(|(s, next)| (Val::Str(s), next)),
        b't' => word(b"true", Val::Bool(true)),
        b'f' => word(b"false", Val::Bool(false)),
        b'n' => word(b"null", Val::Null),
        b'-' | b'0'..=b'9' => {
            let end = number_end(b, i)?;
            Some((Val::Num(line.get(i..end)?), end))
        }
        _ => None,
    }
}

/// The end of a JSON number without an exponent starting at `i`, by JSON's grammar: `-? (0 | [1-9][0-9]*) (. [0-9]+)?`.
fn number_end(b: &[u8], mut i: usize) -> Option<usize> {
    let digits = |mut i: usize| {
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        (i > start).then_some(i)
    };
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    match b.get(i)? {
        b'0' => i += 1,
        b'1'..=b'9' => i = digits(i)?,
        _ => return None,
    }
    if b.get(i) == Some(&b'.') {
        i = digits(i + 1)?;
    }
    // An exponent is left to serde_json, which writes it in its own form (`1E3` as `1e+3`): the text is what the
    // checks and their messages see.
    if matches!(b.get(i), Some(b'e' | b'E')) {
        return None;
    }
    Some(i)
}

/// Checks an event that did not come through the parser (decoded from the binary wire, say) against the parser's
/// rules, with the same reasons and in the same order: shape (names, timestamps, tier count), then numbers in
/// field order. A decoded event is accepted exactly when its JSON form would be.
pub fn validate(event: &Event) -> Result<(), Rejection> {
    fn name(field: &str, s: &str) -> Result<(), Rejection> {
        if s.is_empty() {
            Err(shape_err(format!("`{field}` must not be empty")))
        } else if s.len() > NAME_LEN_MAX {
            Err(shape_err(format!("`{field}` is longer than {NAME_LEN_MAX} bytes")))
        } else if s.chars().any(char::is_control) {
            Err(shape_err(format!("`{field}` contains a control character")))
        } else {
            Ok(())
        }
    }
    fn time(field: &str, s: &str) -> Result<(), Rejection> {
        if Timestamp::parse(s).is_some() {
            Ok(())
        } else {
            Err(shape_err(format!("`{field}` must be an RFC 3339 timestamp, got {s:?}")))
        }
    }
    fn tier_count(tiers: &[TierSpec]) -> Result<(), Rejection> {
        if tiers.is_empty() {
            return Err(shape_err("`tiers` must hold at least one tier".into()));
        }
        if tiers.len() > TIERS_MAX {
            return Err(shape_err(format!("`tiers` holds more than {TIERS_MAX} tiers")));
        }
        Ok(())
    }
    fn num(field: &str, raw: i64, bound: Bound) -> Result<(), Rejection> {
        // The parser's range: |x| < 2^63 × 1e-8.
        if raw == i64::MIN {
            return Err(reject(Reason::InvalidNumber, format!("`{field}`: {}", NumError::OutOfRange)));
        }
        match bound {
            Bound::Positive if raw <= 0 => Err(reject(Reason::InvalidNumber, format!("`{field}` must be > 0"))),
            Bound::NonZero if raw == 0 => Err(reject(Reason::InvalidNumber, format!("`{field}` must not be 0"))),
            Bound::Unit if raw.abs() > Rate::ONE.0 => {
                Err(reject(Reason::InvalidNumber, format!("`{field}` must be between -1 and 1")))
            }
            Bound::Fraction if !(0..=Rate::ONE.0).contains(&raw) => {
                Err(reject(Reason::InvalidNumber, format!("`{field}` must be between 0 and 1")))
            }
            _ => Ok(()),
        }
    }
    fn amount(field: &str, a: Amount, bound: Bound) -> Result<(), Rejection> {
        let raw = i64::try_from(a.0)
            .map_err(|_| reject(Reason::InvalidNumber, format!("`{field}`: {}", NumError::OutOfRange)))?;
        num(field, raw, bound)
    }
    fn tier_numbers(tiers: &[TierSpec]) -> Result<(), Rejection> {
        for (i, t) in tiers.iter().enumerate() {
            if let Some(m) = t.max_notional {
                num(&format!("tier {i}.max_notional"), m.0, Bound::Positive)?;
            }
            num(&format!("tier {i}.imr"), t.imr.0, Bound::Any)?;
            num(&format!("tier {i}.mmr"), t.mmr.0, Bound::Any)?;
        }
        Ok(())
    }
    match event {
        Event::Asset { asset, haircut } => {
            name("asset", asset)?;
            num("haircut", haircut.0, Bound::Any)
        }
        Event::Perp { symbol, underlying, tiers } => {
            name("symbol", symbol)?;
            if let Some(u) = underlying {
                name("underlying", u)?;
            }
            tier_count(tiers)?;
            tier_numbers(tiers)
        }
        Event::Future { symbol, underlying, tiers, expiry } => {
            name("symbol", symbol)?;
            if let Some(u) = underlying {
                name("underlying", u)?;
            }
            tier_count(tiers)?;
            time("expiry", expiry)?;
            tier_numbers(tiers)
        }
        Event::Option { symbol, underlying, strike, expiry, margin, .. } => {
            name("symbol", symbol)?;
            name("underlying", underlying)?;
            time("expiry", expiry)?;
            num("strike", strike.0, Bound::Positive)?;
            num("margin.im_max", margin.im_max.0, Bound::Any)?;
            num("margin.im_min", margin.im_min.0, Bound::Any)?;
            num("margin.mm", margin.mm.0, Bound::Any)
        }
        Event::Price { symbol, price } | Event::Settle { symbol, price } => {
            name("symbol", symbol)?;
            num("price", price.0, Bound::Positive)
        }
        Event::Funding { symbol, rate } => {
            name("symbol", symbol)?;
            num("rate", rate.0, Bound::Unit)
        }
        Event::Deposit { account, asset, amount: a } | Event::Withdraw { account, asset, amount: a } => {
            name("account", account)?;
            name("asset", asset)?;
            amount("amount", *a, Bound::Positive)
        }
        Event::Transfer { account, symbol, amount: a } => {
            name("account", account)?;
            name("symbol", symbol)?;
            amount("amount", *a, Bound::NonZero)
        }
        Event::Trade(fill) | Event::Liquidation(fill) => {
            name("account", &fill.account)?;
            name("symbol", &fill.symbol)?;
            num("qty", fill.qty.0, Bound::Positive)?;
            num("price", fill.price.0, Bound::Positive)?;
            amount("fee", fill.fee, Bound::Any)
        }
        Event::Clock { time } => {
            // The parser's range (anything it produced is within).
            if (Timestamp::MIN..=Timestamp::MAX).contains(time) {
                Ok(())
            } else {
                Err(shape_err("`time` must be an RFC 3339 timestamp, got one out of its range".into()))
            }
        }
        Event::Risk { underlying, params } => {
            name("underlying", underlying)?;
            if !(1..=BUCKETS_MAX).contains(&params.buckets) {
                return Err(shape_err(format!("`buckets` must be an integer from 1 to {BUCKETS_MAX}")));
            }
            for (field, r) in params.rates() {
                num(field, r.0, Bound::Any)?;
            }
            Ok(())
        }
        Event::AccountConfig { account, .. } => name("account", account),
        Event::Insurance { amount: a } => amount("amount", *a, Bound::NonZero),
        Event::LiquidationParams { max_liquidation_fee } => {
            num("max_liquidation_fee", max_liquidation_fee.0, Bound::Fraction)
        }
    }
}

impl From<NumError> for Reason {
    fn from(_: NumError) -> Self {
        Reason::InvalidNumber
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields `read_flat` reads, or `None`.
    fn flat(line: &str) -> Option<Vec<(&str, Val<'_>)>> {
        let mut fields = [("", Val::Null); FLAT_FIELDS_MAX];
        read_flat(line, &mut fields).map(|n| fields[..n].to_vec())
    }

    #[test]
    fn the_timestamp_range_is_the_parsers() {
        // Proves the bounds `validate` holds a decoded clock to are what the parser gives at the range's ends.
        assert_eq!(Timestamp::parse("0000-01-01T00:00:00Z"), Some(Timestamp::MIN));
        assert_eq!(Timestamp::parse("9999-12-31T23:59:59.999999999Z"), Some(Timestamp::MAX));
        assert_eq!(Timestamp::parse("1970-01-01T01:00:00+01:00"), Some(Timestamp(0)));
    }

    #[test]
    fn decoded_events_are_held_to_the_parsers_rules() {
        // Proves `validate` accepts what the parser produces and refuses, with the parser's reason, what the binary
        // wire could carry but JSON could not: empty or control-character names, non-positive quantities and
        // prices, out-of-range amounts, bad timestamps, empty tier tables.
        let lines = [
            r#"{"type":"asset","asset":"BTC","haircut":"0.1"}"#,
            r#"{"type":"perp","symbol":"ETH","tiers":[{"max_notional":"1000","imr":"0.1","mmr":"0.05"},{"imr":"0.2","mmr":"0.1"}]}"#,
            r#"{"type":"future","symbol":"F","tiers":[{"imr":"0.1","mmr":"0.05"}],"expiry":"2027-01-01T00:00:00Z"}"#,
            r#"{"type":"option","symbol":"C","underlying":"BTC","right":"call","strike":"100","expiry":"2027-01-01T00:00:00Z"}"#,
            r#"{"type":"funding","symbol":"ETH","rate":"-0.001"}"#,
            r#"{"type":"transfer","account":"a","symbol":"ETH","amount":"-5"}"#,
            r#"{"type":"trade","account":"a","symbol":"ETH","side":"sell","qty":"1","price":"2","fee":"-0.1"}"#,
        ];
        for l in lines {
            assert_eq!(validate(&parse_line(l).unwrap()), Ok(()), "{l}");
        }
        let trade =
            parse_line(r#"{"type":"trade","account":"a","symbol":"ETH","side":"buy","qty":"1","price":"2"}"#).unwrap();
        let Event::Trade(fill) = trade else { panic!() };
        let bad = |f: Fill| validate(&Event::Trade(f)).unwrap_err().reason;
        assert_eq!(bad(Fill { qty: Qty(0), ..fill.clone() }), Reason::InvalidNumber);
        assert_eq!(bad(Fill { price: Price(-1), ..fill.clone() }), Reason::InvalidNumber);
        assert_eq!(bad(Fill { account: String::new(), ..fill.clone() }), Reason::InvalidEvent);
        assert_eq!(
            bad(Fill { symbol: "E\u{7}".into(), qty: Qty(0), ..fill.clone() }),
            Reason::InvalidEvent,
            "shape first"
        );
        assert_eq!(bad(Fill { fee: Amount(i128::MAX), ..fill.clone() }), Reason::InvalidNumber);
        assert_eq!(bad(Fill { qty: Qty(i64::MIN), ..fill }), Reason::InvalidNumber);
        let deposit = Event::Deposit { account: "a".into(), asset: "USDC".into(), amount: Amount(1 << 70) };
        assert_eq!(validate(&deposit).unwrap_err().reason, Reason::InvalidNumber);
        let perp = Event::Perp { symbol: "P".into(), underlying: None, tiers: vec![] };
        assert_eq!(validate(&perp).unwrap_err().reason, Reason::InvalidEvent);
        let future = Event::Future { symbol: "F".into(), underlying: None, tiers: vec![], expiry: "soon".into() };
        assert_eq!(validate(&future).unwrap_err().reason, Reason::InvalidEvent);
        let funding = Event::Funding { symbol: "ETH".into(), rate: Rate(Rate::ONE.0 + 1) };
        assert_eq!(validate(&funding).unwrap_err().reason, Reason::InvalidNumber);
    }

    fn reason(line: &str) -> Reason {
        match parse_line(line) {
            Ok(e) => panic!("accepted {line}: {e:?}"),
            Err(r) => r.reason,
        }
    }

    #[test]
    fn parses_every_type() {
        // Proves each event type of the contract parses, numbers as strings or plain JSON numbers.
        let lines = [
            r#"{"type":"asset","asset":"BTC","haircut":"0.02"}"#,
            r#"{"type":"perp","symbol":"X","tiers":[{"max_notional":"50000","imr":"0.01","mmr":"0.005"},{"imr":0.02,"mmr":0.01}]}"#,
            r#"{"type":"future","symbol":"F","tiers":[{"imr":"0.1","mmr":"0.05"}],"expiry":"2026-12-25T08:00:00Z"}"#,
            r#"{"type":"option","symbol":"C","underlying":"BTC","right":"call","strike":"70000","expiry":"2026-12-25T08:00:00+01:00"}"#,
            r#"{"type":"price","symbol":"X","price":"1.5"}"#,
            r#"{"type":"funding","symbol":"X","rate":"-0.0001"}"#,
            r#"{"type":"settle","symbol":"F","price":1e3}"#,
            r#"{"type":"deposit","account":"a","asset":"USDC","amount":"10"}"#,
            r#"{"type":"withdraw","account":"a","asset":"USDC","amount":"10"}"#,
            r#"{"type":"transfer","account":"a","symbol":"X","amount":"-10"}"#,
            r#"{"type":"trade","account":"a","symbol":"X","side":"sell","qty":"1","price":"2","fee":"-0.1","margin_mode":"isolated"}"#,
        ];
        for l in lines {
            assert!(parse_line(l).is_ok(), "{l}: {:?}", parse_line(l));
        }
        let Ok(Event::Trade(f)) = parse_line(lines[10]) else { panic!("trade") };
        assert_eq!(f.signed_qty(), Qty(-100_000_000));
        assert_eq!(f.fee, Amount(-10_000_000));
        let Ok(Event::Settle { price, .. }) = parse_line(lines[6]) else { panic!("settle") };
        assert_eq!(price, Price::units(1000));
    }

    #[test]
    fn shape_errors_are_invalid_event() {
        // Proves malformed JSON, wrong types, unknown fields and bad enums are `invalid_event`.
        for l in [
            "not json",
            "[1,2]",
            r#"{"type":"nope"}"#,
            r#"{"type":7}"#,
            r#"{"symbol":"X"}"#,
            r#"{"type":"price","symbol":"X","price":"1","extra":1}"#,
            r#"{"type":"price","symbol":"X"}"#,
            r#"{"type":"price","symbol":5,"price":"1"}"#,
            r#"{"type":"price","symbol":"X","price":true}"#,
            r#"{"type":"trade","account":"a","symbol":"X","side":"long","qty":"1","price":"2"}"#,
            r#"{"type":"perp","symbol":"X","tiers":[]}"#,
            r#"{"type":"perp","symbol":"X","tiers":[{"imr":"0.1"}]}"#,
            r#"{"type":"future","symbol":"F","tiers":[{"imr":"0.1","mmr":"0.05"}],"expiry":"tomorrow"}"#,
            r#"{"type":"deposit","account":"","asset":"USDC","amount":"1"}"#,
        ] {
            assert_eq!(reason(l), Reason::InvalidEvent, "{l}");
        }
    }

    #[test]
    fn number_errors_are_invalid_number() {
        // Proves NaN, huge exponents, 9 places and non-positive values are `invalid_number`.
        for l in [
            r#"{"type":"price","symbol":"X","price":"NaN"}"#,
            r#"{"type":"price","symbol":"X","price":1e400}"#,
            r#"{"type":"price","symbol":"X","price":"0.123456789"}"#,
            r#"{"type":"price","symbol":"X","price":"0"}"#,
            r#"{"type":"deposit","account":"a","asset":"USDC","amount":"-1"}"#,
            r#"{"type":"transfer","account":"a","symbol":"X","amount":"0"}"#,
            r#"{"type":"trade","account":"a","symbol":"X","side":"buy","qty":"0","price":"2"}"#,
        ] {
            assert_eq!(reason(l), Reason::InvalidNumber, "{l}");
        }
    }

    /// Lines every stream is made of, as producers write them.
    const TYPICAL: &[&str] = &[
        r#"{"type":"trade","account":"acct-0000042","symbol":"BTC-PERP","side":"buy","qty":"0.5","price":"64000.25","fee":"1.6"}"#,
        r#"{"type":"trade","account":"a","symbol":"X","side":"sell","qty":1,"price":2.5,"margin_mode":"isolated","liquidation":true}"#,
        r#"{"type":"price","symbol":"ETH-PERP","price":"3012.5"}"#,
        r#"{ "type" : "deposit" , "account" : "a", "asset": "USDC", "amount": "1000" }"#,
        r#"{"type":"withdraw","account":"a","asset":"USDC","amount":"10"}"#,
        r#"{"type":"transfer","account":"a","symbol":"X","amount":"-10"}"#,
        r#"{"type":"funding","symbol":"X","rate":"-0.0001"}"#,
        r#"{"type":"settle","symbol":"F","price":1000}"#,
        r#"{"type":"clock","time":"2026-12-02T08:00:00.5+01:00"}"#,
        r#"{"type":"account_config","account":"a","margin":"portfolio"}"#,
        r#"{"type":"insurance","amount":"-5"}"#,
        r#"{"type":"risk","underlying":"BTC","buckets":7,"vol_up":"0.5","mm_factor":null}"#,
        r#"{"type":"asset","asset":"BTC","haircut":"0.02"}"#,
    ];

    #[test]
    fn typical_lines_take_the_fast_path() {
        // Proves the lines a stream is made of are read in place (the fast path is what runs, not a fallback) and
        // read as serde_json reads them: the same fields and values, the same event.
        for line in TYPICAL {
            let flat = flat(line).unwrap_or_else(|| panic!("not read in place: {line}"));
            let fast = parse_fields(&flat).unwrap_or_else(|r| panic!("{line}: {r:?}"));
            assert_eq!(Ok(fast), parse_line_full(line), "{line}");
            let value: Value = serde_json::from_str(line).unwrap();
            let mut fields = flat.clone();
            fields.sort_by_key(|(k, _)| *k);
            assert_eq!(fields, map_fields(value.as_object().unwrap()), "{line}");
        }
    }

    #[test]
    fn the_fast_path_leaves_what_is_outside_its_subset_to_serde_json() {
        // Proves escapes, nesting, repeated fields, trailing text and malformed numbers are not read in place.
        for line in [
            r#"{"type":"price","symbol":"E\u0054H","price":"1"}"#,
            r#"{"type":"perp","symbol":"X","tiers":[{"imr":"0.1","mmr":"0.05"}]}"#,
            r#"{"type":"price","symbol":"X","symbol":"Y","price":"1"}"#,
            r#"{"type":"price","symbol":"X","price":"1"} x"#,
            r#"{"type":"price","symbol":"X","price":01}"#,
            r#"{"type":"price","symbol":"X","price":1.}"#,
            r#"{"type":"price","symbol":"X","price":-}"#,
            r#"{"type":"price","symbol":"X","price":1e}"#,
            r#"{"type":"settle","symbol":"F","price":1e3}"#,
            r#"{"type":"price","symbol":"X","price":tru}"#,
            "{\"type\":\"price\",\"symbol\":\"X\t\",\"price\":1}",
            r#"{"type":"price","symbol":"X","price":"1",}"#,
            r#"{"type":"price" "symbol":"X"}"#,
            r#"["type"]"#,
            "",
        ] {
            assert!(flat(line).is_none(), "{line}");
            assert_eq!(parse_line(line), parse_line_full(line), "{line}");
        }
        // Within the subset but rejected: the full parser gives the message (here, the first unknown field in the
        // map's order, not the line's).
        let line = r#"{"type":"price","zz":1,"symbol":"X","aa":2,"price":"1"}"#;
        assert!(flat(line).is_some());
        assert_eq!(parse_line(line).unwrap_err().message, "unknown field `aa` in a `price` event");
    }

    /// Pieces lines are assembled from: field names (known, unknown, `type`) and values of every JSON kind, in the
    /// forms that sit on the subset's edges.
    const KEYS: &[&str] = &[
        "type",
        "account",
        "symbol",
        "side",
        "qty",
        "price",
        "fee",
        "margin_mode",
        "liquidation",
        "asset",
        "amount",
        "rate",
        "time",
        "margin",
        "underlying",
        "buckets",
        "haircut",
        "tiers",
        "extra",
        "",
    ];
    const VALUES: &[&str] = &[
        r#""trade""#,
        r#""price""#,
        r#""deposit""#,
        r#""risk""#,
        r#""clock""#,
        r#""insurance""#,
        r#""account_config""#,
        r#""buy""#,
        r#""sell""#,
        r#""isolated""#,
        r#""portfolio""#,
        r#""a""#,
        r#""USDC""#,
        r#""""#,
        r#""\u0041""#,
        r#""a\"b""#,
        "\"\u{e9}t\u{e9}\"",
        "\"\u{7f}\"",
        r#""1""#,
        r#""-1""#,
        r#""0.5""#,
        r#""1e3""#,
        r#""NaN""#,
        r#""2026-12-02T08:00:00Z""#,
        "1",
        "0",
        "-0",
        "-0.0",
        "2.5",
        "1e3",
        "1E+2",
        "1e-9",
        "0.123456789",
        "12345678901234567890",
        "1e400",
        "7",
        "true",
        "false",
        "null",
        "[]",
        "{}",
        r#"[{"imr":"0.1","mmr":"0.05"}]"#,
        r#"{"im_max":"0.2"}"#,
        "01",
        "1.",
        ".5",
        "+1",
        "- 1",
        "tru",
        "nul",
    ];
    const SPACES: &[&str] = &["", "", "", " ", "\t", "\r\n", "  "];

    fn assemble(parts: &[(usize, usize, usize)], tail: usize) -> String {
        let mut line = String::from("{");
        for (n, (k, v, s)) in parts.iter().enumerate() {
            if n > 0 {
                line.push(',');
            }
            let sp = SPACES[s % SPACES.len()];
            line.push_str(&format!("{sp}\"{}\"{sp}:{sp}{}", KEYS[k % KEYS.len()], VALUES[v % VALUES.len()]));
        }
        line.push('}');
        line.push_str(["", " ", "\n", "x", ",", "}"][tail % 6]);
        line
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(4096))]

        #[test]
        fn the_fast_path_and_serde_json_agree(
            parts in proptest::collection::vec((0usize..64, 0usize..64, 0usize..8), 0..10),
            tail in 0usize..6,
        ) {
            // Proves `parse_line` (fast path first) and `parse_line_full` (serde_json) give the same event or the
            // same rejection, message included, on lines assembled from known and unknown fields and values on
            // the subset's edges; and that whatever the fast path reads, it reads as serde_json does.
            let line = assemble(&parts, tail);
            proptest::prop_assert_eq!(parse_line(&line), parse_line_full(&line), "{}", line);
            if let Some(flat) = flat(&line) {
                let value: Value = serde_json::from_str(&line).map_err(|e| {
                    proptest::test_runner::TestCaseError::fail(format!("read in place, refused by serde_json: {e}: {line}"))
                })?;
                let mut fields = flat.clone();
                fields.sort_by_key(|(k, _)| *k);
                let object = value.as_object().ok_or_else(|| proptest::test_runner::TestCaseError::fail("not an object"))?;
                proptest::prop_assert_eq!(fields, map_fields(object), "{}", line);
            }
        }

        #[test]
        fn typical_lines_varied_parse_alike(
            which in 0usize..13,
            changes in proptest::collection::vec((0usize..16, 0usize..64), 0..3),
            order in proptest::collection::vec(0usize..16, 16),
            space in 0usize..8,
        ) {
            // Proves the two readings agree (most of these are accepted) on typical lines with their fields
            // reordered, spaced and some values swapped for values on the subset's edges.
            let flat = flat(TYPICAL[which]).ok_or_else(|| proptest::test_runner::TestCaseError::fail("typical"))?;
            let mut fields: Vec<(String, String)> = flat
                .iter()
                .map(|(k, v)| {
                    let text = match v {
                        Val::Str(s) => format!("{s:?}"),
                        Val::Num(n) => (*n).to_owned(),
                        Val::Bool(b) => b.to_string(),
                        _ => "null".to_owned(),
                    };
                    ((*k).to_owned(), text)
                })
                .collect();
            for (field, value) in &changes {
                let n = fields.len();
                fields[field % n].1 = VALUES[value % VALUES.len()].to_owned();
            }
            for (i, j) in order.iter().enumerate() {
                let n = fields.len();
                fields.swap(i % n, j % n);
            }
            let sp = SPACES[space % SPACES.len()];
            let body: Vec<String> = fields.iter().map(|(k, v)| format!("{sp}\"{k}\":{sp}{v}")).collect();
            let line = format!("{{{}}}", body.join(","));
            proptest::prop_assert_eq!(parse_line(&line), parse_line_full(&line), "{}", line);
        }

        #[test]
        fn mutated_lines_parse_alike(which in 0usize..13, at in 0usize..200, byte in 0u8..128, cut in proptest::bool::ANY) {
            // Proves the two readings agree on typical lines with one byte changed, inserted or cut off.
            let mut bytes = TYPICAL[which].as_bytes().to_vec();
            let at = at % (bytes.len() + 1);
            if cut {
                bytes.truncate(at);
            } else if at < bytes.len() && byte % 2 == 0 {
                bytes[at] = byte;
            } else {
                bytes.insert(at, byte);
            }
            if let Ok(line) = String::from_utf8(bytes) {
                proptest::prop_assert_eq!(parse_line(&line), parse_line_full(&line), "{}", line);
            }
        }
    }

    #[test]
    fn a_check_read_in_place_is_the_trade_the_full_reading_gives() {
        // Proves `parse_flat_trade` returns only what the full reading of the same object (with `type` and the
        // account added) accepts as a trade, and declines what that reading refuses or reads otherwise.
        let bodies = [
            (r#"{"symbol":"ETH","side":"buy","qty":"1","price":"3000"}"#, true),
            (r#"{"symbol":"ETH","side":"sell","qty":0.5,"price":2990,"fee":"-0.1","margin_mode":"isolated"}"#, true),
            (r#"{"symbol":"ETH","side":"buy","qty":"1","price":"3000","liquidation":true}"#, false),
            (r#"{"symbol":"ETH","side":"buy","qty":"0","price":"3000"}"#, false),
            (r#"{"symbol":"ETH","side":"long","qty":"1","price":"3000"}"#, false),
            (r#"{"type":"trade","symbol":"ETH","side":"buy","qty":"1","price":"3000"}"#, false),
            (r#"{"account":"b","symbol":"ETH","side":"buy","qty":"1","price":"3000"}"#, false),
            (r#"{"symbol":"E\u0054H","side":"buy","qty":"1","price":"3000"}"#, false),
            (r#"{"symbol":"ETH","side":"buy","qty":"1","price":"3000","x":1}"#, false),
        ];
        for (body, read) in bodies {
            let fast = parse_flat_trade(body, Some("alice"));
            assert_eq!(fast.is_some(), read, "{body}");
            let full = format!(r#"{{"type":"trade","account":"alice",{}"#, &body[1..]);
            if let Some(fill) = fast {
                assert_eq!(parse_line_full(&full), Ok(Event::Trade(fill)), "{body}");
            }
        }
        // The account inside the object (a batch element).
        let element = r#"{"account":"bob","symbol":"ETH","side":"buy","qty":"1","price":"3000"}"#;
        let fill = parse_flat_trade(element, None).expect("read in place");
        assert_eq!(fill.account, "bob");
        assert_eq!(parse_flat_trade(r#"{"symbol":"ETH","side":"buy","qty":"1","price":"3000"}"#, None), None);
        assert_eq!(parse_flat_trade(r#"{"account":"","symbol":"ETH","side":"buy","qty":"1","price":"3"}"#, None), None);
    }

    #[test]
    fn shape_is_checked_before_numbers() {
        // Proves the contract's order: an unknown field wins over a bad number.
        assert_eq!(reason(r#"{"type":"price","symbol":"X","price":"NaN","x":1}"#), Reason::InvalidEvent);
    }
}
