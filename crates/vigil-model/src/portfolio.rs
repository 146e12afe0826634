//! Portfolio margin (contract v2, `portfolio-margin.md`): Black-76, implied volatility, the scenario grid with
//! vega-power scaled volatility shocks, contingencies, and a group's initial and maintenance margin.
//!
//! Floating point lives here and only here: `ln`, `exp` and the normal distribution need it. Every figure that
//! leaves a group is rounded toward the house at 8 decimal places. The transcendental functions come from `libm`
//! (a pure-Rust port of musl's), not the platform's C library, so the same inputs give the same bits on every
//! machine. The linear part of a group (perps and futures) is computed exactly in fixed point: a futures-only
//! group's figures are exact decimals, as the published checks require.
//!
//! Sharing: a scenario's group PnL is linear in the quantities, so each option instrument's per-unit value
//! changes under the grid ([`OptionVector`]) are computed once per price change and shared by every account
//! holding it; an account's group is then a few dot products ([`group_margin`]).

use crate::event::{Right, Timestamp};
use crate::num::{Amount, Price, Qty, Rate, Round, SCALE, SCALE_I128, SCALE2, checked_mul, div, mul_div};

/// The volatility range implied volatilities are searched in, and clamped to.
pub const SIGMA_MIN: f64 = 0.001;
pub const SIGMA_MAX: f64 = 10.0;
/// The bisection stops when the bracket is this narrow.
pub const SIGMA_TOLERANCE: f64 = 1e-10;
/// Seconds in the model's year (365 days).
pub const YEAR_SECONDS: i64 = 365 * 86_400;
/// The largest `buckets` a `risk` event may set.
pub const BUCKETS_MAX: u32 = 20;

/// The portfolio parameters of one underlying (`risk` event); defaults as the contract states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RiskParams {
    pub price_range: Rate,
    pub buckets: u32,
    pub vol_up: Rate,
    pub vol_down: Rate,
    pub min_vol_up: Rate,
    pub short_vega_power: Rate,
    pub long_vega_power: Rate,
    pub option_contingency: Rate,
    pub future_contingency: Rate,
    pub mm_factor: Rate,
}

const fn rate(raw: i64) -> Rate {
    Rate(raw)
}

impl Default for RiskParams {
    fn default() -> Self {
        Self {
            price_range: rate(16_000_000),
            buckets: 4,
            vol_up: rate(50_000_000),
            vol_down: rate(25_000_000),
            min_vol_up: rate(50_000_000),
            short_vega_power: rate(30_000_000),
            long_vega_power: rate(13_000_000),
            option_contingency: rate(1_000_000),
            future_contingency: rate(1_000_000),
            mm_factor: rate(80_000_000),
        }
    }
}

impl RiskParams {
    /// Why the parameters are out of the contract's bounds, if they are: rates in [0, 1] except `vol_up` in
    /// [0, 10], `mm_factor` in (0, 1], `buckets` in 1..=20.
    pub fn check(&self) -> Result<(), String> {
        if !(1..=BUCKETS_MAX).contains(&self.buckets) {
            return Err(format!("buckets must be 1 to {BUCKETS_MAX}, got {}", self.buckets));
        }
        for (name, r) in self.rates() {
            let (range, shown) = match name {
                "vol_up" => (0..=10 * SCALE, "[0, 10]"),
                "mm_factor" => (1..=SCALE, "(0, 1]"),
                _ => (0..=SCALE, "[0, 1]"),
            };
            if !range.contains(&r.0) {
                return Err(format!("{name} must be in {shown}, got {r}"));
            }
        }
        Ok(())
    }

    /// The rate parameters by the names of their `risk` fields, in the event's order.
    pub fn rates(&self) -> [(&'static str, Rate); 9] {
        [
            ("price_range", self.price_range),
            ("vol_up", self.vol_up),
            ("vol_down", self.vol_down),
            ("min_vol_up", self.min_vol_up),
            ("short_vega_power", self.short_vega_power),
            ("long_vega_power", self.long_vega_power),
            ("option_contingency", self.option_contingency),
            ("future_contingency", self.future_contingency),
            ("mm_factor", self.mm_factor),
        ]
    }

    /// Scenarios in the grid: `3 × (2 × buckets + 1)`.
    pub fn scenario_count(&self) -> usize {
        3 * (2 * self.buckets as usize + 1)
    }

    /// The `i`-th scenario, in the contract's order: `k` ascending, then same, up, down.
    pub fn scenario(&self, i: usize) -> Scenario {
        let b = self.buckets as i32;
        Scenario { k: i as i32 / 3 - b, vol: VOL_CASES[i % 3] }
    }

    /// The relative price move of step `k`, as a float (for repricing options).
    fn move_f64(&self, k: i32) -> f64 {
        to_f64(self.price_range.0) * f64::from(k) / f64::from(self.buckets)
    }
}

/// The volatility case of a scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VolCase {
    Same,
    Up,
    Down,
}

impl VolCase {
    pub fn as_str(self) -> &'static str {
        match self {
            VolCase::Same => "same",
            VolCase::Up => "up",
            VolCase::Down => "down",
        }
    }
}

const VOL_CASES: [VolCase; 3] = [VolCase::Same, VolCase::Up, VolCase::Down];

/// One scenario of the grid: price step `k` of `−buckets..=buckets` and a volatility case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Scenario {
    pub k: i32,
    pub vol: VolCase,
}

impl Scenario {
    /// The relative move `price_range × k / buckets`, exact, rounded to 8 places (toward zero only when it is
    /// not a multiple of 1e-8, for display).
    pub fn price_move(&self, params: &RiskParams) -> Rate {
        let raw = i128::from(params.price_range.0) * i128::from(self.k) / i128::from(params.buckets.max(1));
        Rate(raw as i64)
    }
}

fn to_f64(raw: i64) -> f64 {
    raw as f64 / SCALE as f64
}

/// The standard normal distribution function.
pub fn norm_cdf(x: f64) -> f64 {
    0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
}

/// Black-76 with the forward equal to `u` and no discounting: the value of one option of strike `k` on an
/// underlying at `u`, `t` years before expiry, at volatility `sigma`. With `t = 0` (or `sigma = 0`, or an
/// underlying at or below 0) the value is the intrinsic value. Defined for every input: never NaN for finite
/// positive strikes.
pub fn black76(right: Right, u: f64, k: f64, t: f64, sigma: f64) -> f64 {
    let intrinsic = match right {
        Right::Call => (u - k).max(0.0),
        Right::Put => (k - u).max(0.0),
    };
    if t <= 0.0 || sigma <= 0.0 || u <= 0.0 || k <= 0.0 {
        return intrinsic;
    }
    let sd = sigma * libm::sqrt(t);
    let d1 = (libm::log(u / k) + 0.5 * sd * sd) / sd;
    let d2 = d1 - sd;
    let value = match right {
        Right::Call => u * norm_cdf(d1) - k * norm_cdf(d2),
        Right::Put => k * norm_cdf(-d2) - u * norm_cdf(-d1),
    };
    // Rounding in the tails can leave a hair below intrinsic or above the bound; the true value is within both.
    let bound = match right {
        Right::Call => u,
        Right::Put => k,
    };
    if value.is_finite() { value.clamp(intrinsic, bound) } else { intrinsic }
}

/// The implied volatility of an option whose mark is `mark`: the `σ` in [`SIGMA_MIN`, `SIGMA_MAX`] at which
/// [`black76`] equals the mark, by bisection to [`SIGMA_TOLERANCE`]. A mark at or below what `SIGMA_MIN` gives
/// (intrinsic, or below it: outside the no-arbitrage bounds) is `SIGMA_MIN`; one at or above what `SIGMA_MAX`
/// gives (up to the bound, `u` for a call and `k` for a put, or beyond) is `SIGMA_MAX`. At `t = 0` the value does
/// not depend on `σ`: `SIGMA_MIN`.
pub fn implied_vol(right: Right, u: f64, k: f64, t: f64, mark: f64) -> f64 {
    if t <= 0.0 || u <= 0.0 || k <= 0.0 || !mark.is_finite() {
        return SIGMA_MIN;
    }
    if mark <= black76(right, u, k, t, SIGMA_MIN) {
        return SIGMA_MIN;
    }
    if mark >= black76(right, u, k, t, SIGMA_MAX) {
        return SIGMA_MAX;
    }
    let (mut lo, mut hi) = (SIGMA_MIN, SIGMA_MAX);
    while hi - lo > SIGMA_TOLERANCE {
        let mid = 0.5 * (lo + hi);
        if black76(right, u, k, t, mid) < mark {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Years of 365 days from `now` to `expiry`, 0 once expired.
pub fn years_to_expiry(now: Timestamp, expiry: Timestamp) -> f64 {
    let nanos = (expiry.0 - now.0).max(0);
    nanos as f64 / (YEAR_SECONDS as f64 * Timestamp::NANOS_PER_SECOND as f64)
}

/// The shocked volatility of a scenario's case, for an option `t` years from expiry.
pub fn shocked_vol(params: &RiskParams, sigma: f64, t: f64, case: VolCase) -> f64 {
    let dte = (t * 365.0).max(1.0);
    let power = if dte < 30.0 { params.short_vega_power } else { params.long_vega_power };
    let scale = libm::pow(30.0 / dte, to_f64(power.0));
    match case {
        VolCase::Same => sigma,
        VolCase::Up => (sigma * (1.0 + to_f64(params.vol_up.0) * scale)).max(to_f64(params.min_vol_up.0)),
        VolCase::Down => (sigma * (1.0 - to_f64(params.vol_down.0) * scale)).max(SIGMA_MIN),
    }
}

/// An option instrument's implied volatility and, for each scenario of the grid, the change in value of one unit
/// (`model(U', K, T, σ') − mark`): computed once per change of its mark, its underlying's index, the clock or the
/// parameters, and shared by every account holding it.
#[derive(Clone, Debug, PartialEq)]
pub struct OptionVector {
    pub sigma: f64,
    pub deltas: Vec<f64>,
}

/// The scenario vector of an option (`right`, `strike`) with mark `mark`, underlying index `index`, `t` years
/// before expiry.
pub fn option_vector(
    params: &RiskParams,
    right: Right,
    strike: Price,
    t: f64,
    index: Price,
    mark: Price,
) -> OptionVector {
    let (u, k, m) = (to_f64(index.0), to_f64(strike.0), to_f64(mark.0));
    let sigma = implied_vol(right, u, k, t, m);
    let shocked = [
        shocked_vol(params, sigma, t, VolCase::Same),
        shocked_vol(params, sigma, t, VolCase::Up),
        shocked_vol(params, sigma, t, VolCase::Down),
    ];
    let deltas = (0..params.scenario_count())
        .map(|i| {
            let s = params.scenario(i);
            let moved = u * (1.0 + params.move_f64(s.k));
            black76(right, moved, k, t, shocked[i % 3]) - m
        })
        .collect();
    OptionVector { sigma, deltas }
}

/// A group's margin figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupMargin {
    pub scanning_risk: Amount,
    pub contingency: Amount,
    pub initial_margin: Amount,
    pub maintenance_margin: Amount,
    /// The scenario of the scanning risk (the first of the worst, in the grid's order).
    pub worst: Scenario,
}

/// A position of a group: a perp or future (linear in its underlying) or an option with its instrument's vector.
#[derive(Clone, Copy, Debug)]
pub enum Leg<'a> {
    Linear { qty: Qty, mark: Price },
    Option { qty: Qty, vector: &'a OptionVector },
}

/// The most scenarios a grid has (`buckets` at its maximum).
pub const SCENARIOS_MAX: usize = 3 * STEPS_MAX;
/// The most price steps a grid has.
const STEPS_MAX: usize = 2 * BUCKETS_MAX as usize + 1;

/// What a group's margin takes from its legs besides its options' sums per scenario: the linear legs' exposure
/// `Σ q × P` (exact, at 1e-16) with its part of every price step, the net short option quantity and the hedged
/// linear quantity the contingencies charge. It stays the same while the legs' quantities, the linear legs' marks
/// and the parameters do: a tick of the index moves only the options' sums and the index the contingencies are
/// charged at, so a caller that keeps a group's shape revalues it from its options' vectors alone
/// ([`group_margin_from`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupShape {
    steps: LinearSteps,
    /// The linear part of one price step as a float, at 1e-8 (for the bounded search).
    step_f64: F64Bits,
    short_options: i128,
    hedged_linear: i128,
    any_option: bool,
}

impl GroupShape {
    /// The shape of `legs` under `params`; `None` if the linear exposure does not fit.
    pub fn new(params: &RiskParams, legs: &[Leg<'_>]) -> Option<GroupShape> {
        GroupShape::of_quantities(params, leg_quantities(legs))
    }

    /// The shape of a group whose legs are `(quantity, Some(mark))` for a perp or future and `(quantity, None)`
    /// for an option; `None` if the linear exposure does not fit.
    pub fn of_quantities(params: &RiskParams, legs: impl IntoIterator<Item = (Qty, Option<Price>)>) -> Option<Self> {
        Some(GroupShape::from_totals(params, &LegTotals::of(legs)?))
    }

    /// The shape of a group whose legs add up to `totals`.
    fn from_totals(params: &RiskParams, totals: &LegTotals) -> Self {
        let &LegTotals { exposure, short_options, hedged_linear, any_option } = totals;
        let buckets = params.buckets.max(1) as i32;
        let steps = LinearSteps::new(exposure, params.price_range, buckets);
        // Exposure at 1e-16 × range at 1e-8 / (buckets × 1e16): the step at 1e-8.
        let step_f64 = F64Bits(exposure as f64 * params.price_range.0 as f64 / (f64::from(buckets) * 1e16));
        GroupShape { steps, step_f64, short_options, hedged_linear, any_option }
    }
}

/// What a group's legs add up to: the linear exposure `Σ q × P` (exact, at 1e-16), the net short option quantity,
/// the hedged linear quantity (`min(total long, total short)`), and whether any leg is an option.
struct LegTotals {
    exposure: i128,
    short_options: i128,
    hedged_linear: i128,
    any_option: bool,
}

impl LegTotals {
    /// From legs `(quantity, Some(mark))` for a perp or future and `(quantity, None)` for an option; `None` if the
    /// exposure does not fit.
    fn of(legs: impl IntoIterator<Item = (Qty, Option<Price>)>) -> Option<Self> {
        let mut linear = LinearTotals::default();
        let mut short_options = 0i128;
        let mut any_option = false;
        for (qty, mark) in legs {
            match mark {
                None => {
                    any_option = true;
                    short_options += (-qty.wide()).max(0);
                }
                Some(mark) => linear.add(qty, mark)?,
            }
        }
        Some(LegTotals { short_options, any_option, ..linear.totals() })
    }
}

/// A group's perp and future legs added up, leg by leg: what [`linear_group_margin_of`] takes for a group without
/// options, so that a caller holding the legs in its own layout need not form [`Leg`]s.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinearTotals {
    /// `Σ q × P`, exact at 1e-16.
    exposure: i128,
    long: i128,
    short: i128,
}

impl LinearTotals {
    /// No leg yet.
    pub const ZERO: Self = Self { exposure: 0, long: 0, short: 0 };

    /// Adds a leg of `qty` at `mark`; `None` if the exposure no longer fits (the group is then not formed).
    #[inline]
    pub fn add(&mut self, qty: Qty, mark: Price) -> Option<()> {
        // Each product of two i64 fits; the quantities' sums stay far from i128's bounds.
        self.exposure = self.exposure.checked_add(qty.wide() * mark.wide())?;
        if qty.0 > 0 {
            self.long += qty.wide();
        } else {
            self.short -= qty.wide();
        }
        Some(())
    }

    fn totals(&self) -> LegTotals {
        LegTotals {
            exposure: self.exposure,
            short_options: 0,
            hedged_linear: self.long.min(self.short),
            any_option: false,
        }
    }
}

/// [`group_margin`] of a group of perps and futures only, from its legs added up in order ([`LinearTotals::add`]):
/// the same figures, bit for bit.
pub fn linear_group_margin_of(params: &RiskParams, index: Price, totals: &LinearTotals) -> Option<GroupMargin> {
    let totals = totals.totals();
    if let Some(margin) = linear_group_margin(params, index, &totals) {
        return Some(margin);
    }
    let shape = GroupShape::from_totals(params, &totals);
    // No option adds to a scenario: every sum is zero.
    let options = [0.0f64; SCENARIOS_MAX];
    group_margin_from(params, index, &shape, options.get(..params.scenario_count())?)
}

/// Bounds on the maintenance margin of a group of perps and futures only (what [`linear_group_margin_of`] gives),
/// without its divisions: `(lower, width)` with `lower / 1e16 ≤ MM < lower / 1e16 + width` (MM in 1e-8 units,
/// `lower` at 1e-24), for a caller that needs the margin only to compare an equity with it (a stress pass, which
/// takes the exact figure when the equity falls within the bounds).
///
/// With `X = |E × R| + C` (`E × R` the exposure times the price range at 1e-24, `C = future_contingency × U ×
/// min(long, short)` at 1e-24): the scanning risk rounds `|E × R| / 1e16` up and the contingency `C / 1e16` up, so
/// `IM ∈ [X / 1e16, X / 1e16 + 2)`; `MM = ⌈IM × f / 1e8⌉` (`f` the `mm_factor`) lies in `[X × f / 1e24, X × f /
/// 1e24 + 2f / 1e8 + 1)`. So `lower = ⌊X × f / 1e8⌋` and `width = 2⌈f / 1e8⌉ + 2` (4 for every valid `f`, which is
/// at most 1). `None` where [`linear_group_margin_of`] searches the grid instead (a short exposure that moves by less than
/// a unit a step), for a negative rate, or when a product does not fit: the exact margin tells then. When this is
/// `Some`, so is [`linear_group_margin_of`] (every figure it forms is at most one this formed).
pub fn linear_group_mm_bound(params: &RiskParams, index: Price, totals: &LinearTotals) -> Option<(i128, u32)> {
    let (rate, f) = (params.future_contingency.wide(), params.mm_factor.wide());
    if rate < 0 || f < 0 {
        return None;
    }
    let base = mul_rate(totals.exposure, params.price_range.0)?;
    let b = i128::from(params.buckets.max(1));
    if base < 0 && base > -b * SCALE2 {
        return None;
    }
    let hedged = totals.long.min(totals.short);
    let contingency = if hedged == 0 { 0 } else { checked_mul(rate * index.wide(), hedged)? };
    let x = base.checked_abs()?.checked_add(contingency)?;
    let lower = div(mul_rate(x, params.mm_factor.0)?, SCALE_I128, Round::Floor)?;
    let width = if f <= SCALE_I128 { 4 } else { 2 * u32::try_from(div(f, SCALE_I128, Round::Ceil)?).ok()? + 2 };
    Some((lower, width))
}

/// `a × r` for a rate `r`: without an overflow test for a rate in [0, 1] (below 2^27) and an `|a|` below 2^100
/// (the product is then below 2^127), else through [`checked_mul`] (two 128-bit bit counts: not free without a
/// bit-count instruction).
#[inline(always)]
fn mul_rate(a: i128, r: i64) -> Option<i128> {
    if (0..=SCALE).contains(&r) && a.unsigned_abs() >> 100 == 0 {
        return Some(a * i128::from(r));
    }
    checked_mul(a, i128::from(r))
}

/// A group's legs as [`GroupShape::of_quantities`] and [`LegTotals::of`] take them.
fn leg_quantities<'a>(legs: &'a [Leg<'_>]) -> impl Iterator<Item = (Qty, Option<Price>)> + 'a {
    legs.iter().map(|leg| match leg {
        Leg::Linear { qty, mark } => (*qty, Some(*mark)),
        Leg::Option { qty, .. } => (*qty, None),
    })
}

/// A float compared by its bits, so that a shape is `Eq` (the same bits are the same step).
#[derive(Clone, Copy, Debug)]
struct F64Bits(f64);

impl PartialEq for F64Bits {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}

impl Eq for F64Bits {}

/// An option leg's quantity as the dot products weigh it (in units, as a float).
pub fn leg_weight(qty: Qty) -> f64 {
    to_f64(qty.0)
}

/// Adds a group's option legs to `sums`, scenario by scenario: `Σ q × Δ`, the legs in their order, each term
/// [`leg_weight`]` × Δ` added to what the earlier legs left (from zero). This is the options' part
/// [`group_margin_from`] takes; a caller that keeps the vectors elsewhere must add in the same order to get the
/// same bits.
pub fn add_options(legs: &[Leg<'_>], sums: &mut [f64]) {
    for leg in legs {
        if let Leg::Option { qty, vector } = leg {
            let q = leg_weight(*qty);
            for (sum, d) in sums.iter_mut().zip(&vector.deltas) {
                *sum += q * d;
            }
        }
    }
}

/// A group's shape with its options' sums per scenario (a float dot product, legs added in their order).
struct Sums<'a> {
    shape: &'a GroupShape,
    options: &'a [f64],
}

impl Sums<'_> {
    /// Scenario `i`'s options part at 1e-8, rounded toward the house (down).
    fn options_e8(&self, i: usize) -> Option<i128> {
        if self.shape.any_option { float_to_e8(*self.options.get(i)?, Round::Floor) } else { Some(0) }
    }

    /// Calls `each(i, pnl)` for every scenario of the grid in order, with its exact PnL at 1e-8 (the linear part
    /// exact, `Σ q × P × price_range × k / buckets` floored with one division per price step, plus the options'
    /// part floored once). `None` if a figure does not fit.
    fn for_each_exact(&self, params: &RiskParams, mut each: impl FnMut(usize, i128)) -> Option<()> {
        let b = params.buckets.max(1) as i32;
        for (step_index, k) in (-b..=b).enumerate() {
            let linear = self.shape.steps.at(k)?;
            for case in 0..3 {
                let i = step_index * 3 + case;
                each(i, linear.checked_add(self.options_e8(i)?)?);
            }
        }
        Some(())
    }

    /// The first scenario with the lowest exact PnL, and that PnL: what a scan of [`Sums::for_each_exact`] finds,
    /// without the exact arithmetic for every scenario. A float pass bounds each scenario's PnL; only the
    /// scenarios that could be the worst are computed exactly, in the grid's order.
    ///
    /// Why it is exact: scenario `i` at step `k` is exactly `L + floor(s)`, with `L = floor(x)`, `x` the real
    /// linear part and `s = options × 1e8` (the float the exact path floors). `f = k × x₁ + s` in floats, with
    /// `x₁ = E × R / D` (`E` the exposure, `R` the range, `D = buckets × 1e16`, exact in a double), is within
    /// `8u(|k x₁| + |s|)` of `x + s` (`u = 2⁻⁵³`: five roundings), and `x + s − 2 < L + floor(s) ≤ x + s`. So
    /// if `m` is the lowest `f`, the worst scenario has `f ≤ m + 2 + 2 × 8u × M` (`M` the largest `|k x₁| + |s|`):
    /// every scenario within `3 + 2⁻⁴⁸ × M` of `m` is a candidate. `None` (use the full scan) when a figure
    /// is not finite or large enough for the bound to matter.
    ///
    /// Both passes go step by step (three scenarios each) and compute each scenario's float the same way; the
    /// first keeps each step's lowest, so the second skips the steps with no candidate.
    fn worst_by_bound(&self, params: &RiskParams) -> Option<(usize, i128)> {
        let b = params.buckets.max(1) as i32;
        let step = self.shape.step_f64.0;
        let any_option = self.shape.any_option;
        let approx = |j: usize, s: f64| -> (f64, f64) {
            let linear = f64::from(j as i32 - b) * step;
            let s = if any_option { s * SCALE as f64 } else { 0.0 };
            (linear + s, linear.abs() + s.abs())
        };
        // The lowest float is at each step's lowest options sum (`x ↦ linear + x × 1e8` is monotone in floats,
        // rounding included), so one pass over the sums finds it; `largest` is bounded above by the largest linear
        // part plus the largest options part, which only widens the candidates (a larger bound stays exact).
        let (mut lowest, mut largest_s, mut not_a_number) = (f64::INFINITY, 0.0f64, false);
        let mut step_lowest = [0.0f64; STEPS_MAX];
        for ((j, scenarios), at_step) in self.options.chunks_exact(3).enumerate().zip(&mut step_lowest) {
            let mut least = f64::INFINITY;
            for &s in scenarios {
                not_a_number |= s.is_nan();
                least = if s < least { s } else { least };
                largest_s = if s.abs() > largest_s { s.abs() } else { largest_s };
            }
            let (a, _) = approx(j, least);
            *at_step = a;
            lowest = if a < lowest { a } else { lowest };
        }
        let (largest_linear, _) = approx(0, 0.0);
        let largest = largest_linear.abs() + if any_option { largest_s * SCALE as f64 } else { 0.0 };
        // Below 4e18 every s takes float_to_e8's exact i64 path and no exact sum overflows (NaN is refused).
        if not_a_number || largest.is_nan() || largest >= 4.0e18 || lowest.is_nan() {
            return None;
        }
        let bound = lowest + 3.0 + largest * f64::powi(2.0, -48);
        let mut worst: Option<(usize, i128)> = None;
        for ((j, scenarios), at_step) in self.options.chunks_exact(3).enumerate().zip(step_lowest) {
            if at_step > bound {
                continue;
            }
            let mut linear: Option<i128> = None;
            for (case, &s) in scenarios.iter().enumerate() {
                if approx(j, s).0 > bound {
                    continue;
                }
                let l = match linear {
                    Some(l) => l,
                    None => *linear.insert(self.shape.steps.at(j as i32 - b)?),
                };
                let i = 3 * j + case;
                let pnl = l.checked_add(self.options_e8(i)?)?;
                if worst.is_none_or(|(_, w)| pnl < w) {
                    worst = Some((i, pnl));
                }
            }
        }
        worst
    }

    /// [`Sums::worst_by_bound`], or the full exact scan where the bound does not apply. `None` if a figure does
    /// not fit.
    fn worst(&self, params: &RiskParams) -> Option<(usize, i128)> {
        if let Some(w) = self.worst_by_bound(params) {
            return Some(w);
        }
        self.worst_by_scan(params)
    }

    fn worst_by_scan(&self, params: &RiskParams) -> Option<(usize, i128)> {
        let (mut worst_i, mut worst_pnl) = (0, i128::MAX);
        self.for_each_exact(params, |i, pnl| {
            // The first of equal losses wins: the contract's tie-break (k ascending, then same, up, down).
            if pnl < worst_pnl {
                (worst_i, worst_pnl) = (i, pnl);
            }
        })?;
        Some((worst_i, worst_pnl))
    }
}

/// The linear part of every price step, `floor(exposure × price_range × k / (buckets × 1e16))` at 1e-8, with one
/// 128-bit division per group instead of one per step: with `exposure × price_range = q × d + r` (`d` the divisor,
/// `0 ≤ r < d`), step `k` is `k × q + floor(k × r / d)`, and `k × r` fits 64 bits. Exactly `mul_div`'s answer
/// (a test compares them); `mul_div` itself where the product does not fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LinearSteps {
    exposure: i128,
    price_range: i128,
    divisor: i128,
    split: Option<(i128, i64)>,
}

impl LinearSteps {
    fn new(exposure: i128, price_range: Rate, buckets: i32) -> LinearSteps {
        let divisor = i128::from(buckets) * SCALE2;
        let price_range = i128::from(price_range.0);
        let split =
            exposure.checked_mul(price_range).map(|base| (base.div_euclid(divisor), base.rem_euclid(divisor) as i64));
        LinearSteps { exposure, price_range, divisor, split }
    }

    fn at(&self, k: i32) -> Option<i128> {
        if self.exposure == 0 {
            return Some(0);
        }
        match self.split {
            // divisor ≤ 20 × 1e16 and |k| ≤ 20: k × r < 4e18 fits i64.
            Some((q, r)) => {
                let small = (i64::from(k) * r).div_euclid(self.divisor as i64);
                q.checked_mul(i128::from(k))?.checked_add(i128::from(small))
            }
            None => mul_div(self.exposure, self.price_range * i128::from(k), self.divisor, Round::Floor),
        }
    }
}

/// The PnL of each scenario of the grid for a group's legs, at 1e-8, rounded toward the house (down): see
/// [`Sums::for_each_exact`]. `None` if a figure does not fit.
pub fn scenario_pnls(params: &RiskParams, legs: &[Leg<'_>]) -> Option<Vec<i128>> {
    let shape = GroupShape::new(params, legs)?;
    let mut options = vec![0.0; params.scenario_count()];
    add_options(legs, &mut options);
    let mut out = Vec::with_capacity(params.scenario_count());
    Sums { shape: &shape, options: &options }.for_each_exact(params, |_, pnl| out.push(pnl))?;
    Some(out)
}

/// A float amount as 1e-8 units, rounded as asked; `None` if not finite or beyond `i128`. Within `i64` (the
/// common case) by truncation and one correction, which gives exactly what `floor`/`ceil` would, without their
/// library call.
fn float_to_e8(x: f64, round: Round) -> Option<i128> {
    let scaled = x * SCALE as f64;
    if scaled.abs() < 9.0e18 && round != Round::Nearest {
        let t = scaled as i64;
        let t = match round {
            Round::Floor if (t as f64) > scaled => t - 1,
            Round::Ceil if (t as f64) < scaled => t + 1,
            _ => t,
        };
        return Some(i128::from(t));
    }
    let r = match round {
        Round::Floor => scaled.floor(),
        Round::Ceil => scaled.ceil(),
        Round::Nearest => scaled.round(),
    };
    // i128::MAX as f64 rounds up to 2^127, which does not fit: stay strictly below it.
    (r.is_finite() && r.abs() < 1.7e38).then_some(r as i128)
}

/// A group's margin: the scanning risk (the worst scenario loss), the contingencies at the underlying's index
/// `index` (options: `option_contingency × U × Σ net short option quantity`; perps and futures:
/// `future_contingency × U × min(total long, total short)`), `IM = scanning risk + contingencies` and
/// `MM = mm_factor × IM`, each rounded up. `None` if a figure does not fit.
pub fn group_margin(params: &RiskParams, index: Price, legs: &[Leg<'_>]) -> Option<GroupMargin> {
    let totals = LegTotals::of(leg_quantities(legs))?;
    if let Some(margin) = linear_group_margin(params, index, &totals) {
        return Some(margin);
    }
    let shape = GroupShape::from_totals(params, &totals);
    let mut options = [0.0f64; SCENARIOS_MAX];
    let options = options.get_mut(..params.scenario_count())?;
    add_options(legs, options);
    group_margin_from(params, index, &shape, options)
}

/// [`group_margin`] from a group's [`GroupShape`] (under the same `params`) and its options' sums per scenario
/// ([`add_options`]; one per scenario of the grid): the same figures, bit for bit, for a caller that keeps the
/// shape between ticks of the index and the vectors in its own layout. `None` if a figure does not fit or
/// `options` does not have one sum per scenario.
pub fn group_margin_from(
    params: &RiskParams,
    index: Price,
    shape: &GroupShape,
    options: &[f64],
) -> Option<GroupMargin> {
    if options.len() != params.scenario_count() {
        return None;
    }
    let (worst_i, worst_pnl) = Sums { shape, options }.worst(params)?;
    margin_of_worst(params, index, (shape.short_options, shape.hedged_linear), (worst_i, worst_pnl))
}

/// [`group_margin`] of a group without options, where the grid's first worst scenario is at one end: the linear
/// PnL `floor(E × R × k / (buckets × 1e16))` (`E = Σ q × P`, `R` the price range) is monotone in the step `k`, so
/// with `E ≥ 0` the first lowest is the bottom step's first case; with `E × R ≤ −buckets × 1e16` every step
/// lowers it by at least one unit, so the lowest is the top step's first case, alone. At the ends the step is
/// `floor(∓E × R / 1e16)`: one division by 1e16, no search. `None` (the search decides) otherwise: an option leg,
/// a short exposure that moves by less than a unit a step (equal steps: the first of them is the worst), or a
/// figure that does not fit.
fn linear_group_margin(params: &RiskParams, index: Price, totals: &LegTotals) -> Option<GroupMargin> {
    if totals.any_option {
        return None;
    }
    let exposure = totals.exposure;
    let b = params.buckets.max(1);
    let base = mul_rate(exposure, params.price_range.0)?;
    let worst = if base >= 0 {
        (0, div(-base, SCALE2, Round::Floor)?)
    } else if base <= -(i128::from(b) * SCALE2) {
        (6 * b as usize, div(base, SCALE2, Round::Floor)?)
    } else {
        return None;
    };
    margin_of_worst(params, index, (0, totals.hedged_linear), worst)
}

/// A group's margin from its worst scenario (index, PnL) and the quantities its contingencies charge (net short
/// options, hedged linear).
fn margin_of_worst(
    params: &RiskParams,
    index: Price,
    (short_options, hedged_linear): (i128, i128),
    (worst_i, worst_pnl): (usize, i128),
) -> Option<GroupMargin> {
    let scanning = worst_pnl.checked_neg()?.max(0);
    let charge = |rate: Rate, qty: i128| -> Option<i128> {
        if qty == 0 {
            // What the division gives, without its six steps (a group hedged one way only charges nothing here).
            return Some(0);
        }
        // rate (1e-8) × U (1e-8) × qty (1e-8) → 1e-24; / 1e16 → 1e-8, up.
        mul_div(rate.wide() * index.wide(), qty, SCALE2, Round::Ceil)
    };
    let contingency = charge(params.option_contingency, short_options)?
        .checked_add(charge(params.future_contingency, hedged_linear)?)?;
    let im = scanning.checked_add(contingency)?;
    let mm = mul_div(im, params.mm_factor.wide(), SCALE_I128, Round::Ceil)?;
    Some(GroupMargin {
        scanning_risk: Amount(scanning),
        contingency: Amount(contingency),
        initial_margin: Amount(im),
        maintenance_margin: Amount(mm),
        worst: params.scenario(worst_i),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_linear_margin_bound_holds_the_exact_margin() {
        // Proves `linear_group_mm_bound` brackets `linear_group_margin_of`'s maintenance margin whenever it answers,
        // and answers for most groups: random groups of one to four perps and futures (hedged and not, exposures
        // of every size and both signs), random grids, contingencies, factors and indexes.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        // A value of up to `digits` random digits (at least one), at least 1.
        let mut magnitude = |digits: u64| {
            let d = 1 + next(digits) as u32;
            1 + next(10u64.pow(d)) as i64
        };
        let (mut bounded, mut total) = (0, 0);
        for _ in 0..100_000 {
            let params = RiskParams {
                price_range: Rate(magnitude(8)),
                buckets: magnitude(1) as u32 % 20 + 1,
                future_contingency: Rate(magnitude(9) % 1_000_000_000 - 1),
                mm_factor: Rate(magnitude(8)),
                ..RiskParams::default()
            };
            let index = Price(magnitude(14));
            let mut totals = LinearTotals::ZERO;
            for leg in 0..1 + magnitude(1) % 4 {
                let qty = magnitude(13);
                let qty = Qty(if (qty + leg) % 2 == 0 { qty } else { -qty });
                totals.add(qty, Price(magnitude(14))).expect("fits");
            }
            total += 1;
            let exact = linear_group_margin_of(&params, index, &totals);
            let Some((lower, width)) = linear_group_mm_bound(&params, index, &totals) else { continue };
            bounded += 1;
            let mm = exact.expect("formed when bounded").maintenance_margin.0 * SCALE2;
            let upper = lower + i128::from(width) * SCALE2;
            assert!(lower <= mm && mm < upper, "{params:?} {index:?} {totals:?}: {mm} not in [{lower}, {upper})");
            assert_eq!(width, 4);
        }
        assert!(bounded * 4 > total * 3, "{bounded} of {total} bounded");
    }

    fn shape_and_sums(params: &RiskParams, legs: &[Leg<'_>]) -> (GroupShape, Vec<f64>) {
        let mut options = vec![0.0; params.scenario_count()];
        add_options(legs, &mut options);
        (GroupShape::new(params, legs).unwrap(), options)
    }

    fn p(s: &str) -> Price {
        Price::parse(s).unwrap()
    }
    fn q(s: &str) -> Qty {
        Qty::parse(s).unwrap()
    }
    fn r(s: &str) -> Rate {
        Rate::parse(s).unwrap()
    }

    #[test]
    fn black76_matches_hulls_published_futures_option() {
        // Hull, "Options, Futures, and Other Derivatives", the example of a European put on a futures contract:
        // F = K = 20, r = 9%, T = 4 months, σ = 25%: p = 1.12. Black-76 discounts by e^(−rT); the contract's model
        // does not, so the undiscounted value times e^(−0.09 × 4/12) must give Hull's figure.
        let undiscounted = black76(Right::Put, 20.0, 20.0, 4.0 / 12.0, 0.25);
        let hull = undiscounted * (-0.09f64 * 4.0 / 12.0).exp();
        assert!((hull - 1.12).abs() < 0.005, "{hull}");
        // At the money a call and a put are worth the same (no discounting), about 0.4 × F × σ × √T.
        let call = black76(Right::Call, 20.0, 20.0, 4.0 / 12.0, 0.25);
        assert!((call - undiscounted).abs() < 1e-12);
        assert!((call - 0.4 * 20.0 * 0.25 * (4.0f64 / 12.0).sqrt()).abs() < 0.01);
    }

    #[test]
    fn black76_matches_values_computed_independently() {
        // Values computed with CPython 3.11.7's math.erfc and math.log (glibc's, not this crate's libm), double
        // precision, from the contract's formulas: N(x) = erfc(−x/√2)/2, d1 = (ln(U/K) + σ²T/2)/(σ√T),
        // call = U·N(d1) − K·N(d2), put = K·N(−d2) − U·N(−d1).
        let cases = [
            // right, U, K, T, σ, value
            (Right::Call, 60_000.0, 65_000.0, 30.0 / 365.0, 0.6, 2_237.868_155_404_663_4),
            (Right::Put, 60_000.0, 65_000.0, 30.0 / 365.0, 0.6, 7_237.868_155_404_656),
            (Right::Call, 3_000.0, 2_500.0, 0.25, 0.8, 729.702_367_738_062_8),
            (Right::Put, 100.0, 100.0, 1.0, 0.2, 7.965_567_455_405_804),
            (Right::Call, 100.0, 1_000.0, 0.1, 1.5, 1.689_427_252_272_296_7e-5),
        ];
        for (right, u, k, t, sigma, expected) in cases {
            let got = black76(right, u, k, t, sigma);
            assert!((got - expected).abs() <= 1e-9 * expected.abs().max(1e-3), "{right:?} {u} {k} {t} {sigma}: {got}");
        }
    }

    #[test]
    fn put_call_parity_and_intrinsic_at_expiry() {
        for (u, k) in [(50.0, 40.0), (40.0, 50.0), (1e-6, 1e6), (1e6, 1e-6)] {
            let (c, p) = (black76(Right::Call, u, k, 0.5, 0.7), black76(Right::Put, u, k, 0.5, 0.7));
            assert!((c - p - (u - k)).abs() <= 1e-9 * u.max(k), "{u} {k}: {c} {p}");
            assert_eq!(black76(Right::Call, u, k, 0.0, 0.7), (u - k).max(0.0));
            assert_eq!(black76(Right::Put, u, k, 0.0, 0.7), (k - u).max(0.0));
        }
    }

    #[test]
    fn implied_vol_recovers_the_volatility_and_has_an_answer_for_every_mark() {
        for sigma in [0.05, 0.3, 0.8, 2.5, 7.0] {
            for (right, k) in [(Right::Call, 55_000.0), (Right::Put, 65_000.0), (Right::Call, 60_000.0)] {
                let mark = black76(right, 60_000.0, k, 0.1, sigma);
                let iv = implied_vol(right, 60_000.0, k, 0.1, mark);
                assert!((iv - sigma).abs() < 1e-7, "{right:?} {k} {sigma}: {iv}");
            }
        }
        // Outside the no-arbitrage bounds, at them, at expiry, degenerate inputs: clamped, never NaN.
        assert_eq!(implied_vol(Right::Call, 100.0, 90.0, 0.5, 5.0), SIGMA_MIN); // below intrinsic
        assert_eq!(implied_vol(Right::Call, 100.0, 90.0, 0.5, 10.0), SIGMA_MIN); // at intrinsic
        assert_eq!(implied_vol(Right::Call, 100.0, 90.0, 0.5, 100.0), SIGMA_MAX); // at the bound U
        assert_eq!(implied_vol(Right::Put, 100.0, 90.0, 0.5, 1e9), SIGMA_MAX); // beyond the bound K
        assert_eq!(implied_vol(Right::Put, 100.0, 90.0, 0.0, 3.0), SIGMA_MIN); // T = 0
        assert_eq!(implied_vol(Right::Put, 100.0, 90.0, 0.5, f64::NAN), SIGMA_MIN);
        assert_eq!(implied_vol(Right::Call, 0.0, 90.0, 0.5, 1.0), SIGMA_MIN);
        let far = implied_vol(Right::Call, 100.0, 1e7, 0.01, 1e-8);
        assert!((SIGMA_MIN..=SIGMA_MAX).contains(&far), "{far}");
    }

    #[test]
    fn the_grid_is_in_the_contracts_order() {
        let params = RiskParams::default();
        assert_eq!(params.scenario_count(), 27);
        assert_eq!(params.scenario(0), Scenario { k: -4, vol: VolCase::Same });
        assert_eq!(params.scenario(1), Scenario { k: -4, vol: VolCase::Up });
        assert_eq!(params.scenario(2), Scenario { k: -4, vol: VolCase::Down });
        assert_eq!(params.scenario(26), Scenario { k: 4, vol: VolCase::Down });
        assert_eq!(params.scenario(0).price_move(&params), r("-0.16"));
        assert_eq!(params.scenario(15).price_move(&params), r("0.04"));
    }

    #[test]
    fn vol_shocks_follow_days_to_expiry() {
        let params = RiskParams::default();
        // 30 days: the factor (30/DTE)^power is 1.
        let t = 30.0 / 365.0;
        assert!((shocked_vol(&params, 0.6, t, VolCase::Up) - 0.9).abs() < 1e-12);
        assert!((shocked_vol(&params, 0.6, t, VolCase::Down) - 0.45).abs() < 1e-12);
        assert_eq!(shocked_vol(&params, 0.6, t, VolCase::Same), 0.6);
        // min_vol_up floors the up case; the down case never goes below SIGMA_MIN.
        assert!((shocked_vol(&params, 0.1, t, VolCase::Up) - 0.5).abs() < 1e-12);
        let harsh = RiskParams { vol_down: r("1"), ..params };
        assert_eq!(shocked_vol(&harsh, 0.6, 1.0 / 365.0, VolCase::Down), SIGMA_MIN);
        // 1 day (and anything shorter, floored at a day) uses short_vega_power: 30^0.3.
        let short = 0.6 * (1.0 + 0.5 * 30f64.powf(0.3));
        assert!((shocked_vol(&params, 0.6, 0.0, VolCase::Up) - short).abs() < 1e-9);
        // 120 days uses long_vega_power: (30/120)^0.13.
        let long = 0.6 * (1.0 + 0.5 * 0.25f64.powf(0.13));
        assert!((shocked_vol(&params, 0.6, 120.0 / 365.0, VolCase::Up) - long).abs() < 1e-9);
    }

    #[test]
    fn dederi_futures_only_check() {
        // Long 10 futures at 2 253.2, price_range 0.15: the −15% scenario loses 3 379.8; nothing offsets.
        let params = RiskParams { price_range: r("0.15"), ..RiskParams::default() };
        let legs = [Leg::Linear { qty: q("10"), mark: p("2253.2") }];
        let g = group_margin(&params, p("2253.2"), &legs).unwrap();
        assert_eq!(g.scanning_risk.to_string(), "3379.80000000");
        assert_eq!(g.contingency, Amount::ZERO);
        assert_eq!(g.initial_margin.to_string(), "3379.80000000");
        assert_eq!(g.maintenance_margin.to_string(), "2703.84000000");
        assert_eq!(g.worst, Scenario { k: -4, vol: VolCase::Same });
    }

    #[test]
    fn mcmillans_span_risk_array_check() {
        // One long S&P future at 4 000, 500 units (one contract at $500 a point), a 20-point scan range
        // (price_range 0.005) in thirds: the requirement is the array's largest loss, $10 000; the −1/3 and −2/3
        // scenarios lose 3 333.33 and 6 666.67 (McMillan rounds to 3 330 and 6 670).
        let params = RiskParams { price_range: r("0.005"), buckets: 3, ..RiskParams::default() };
        let legs = [Leg::Linear { qty: q("500"), mark: p("4000") }];
        let g = group_margin(&params, p("4000"), &legs).unwrap();
        assert_eq!(g.scanning_risk.to_string(), "10000.00000000");
        let pnls = scenario_pnls(&params, &legs).unwrap();
        let at = |k: i32| pnls[((k + 3) * 3) as usize];
        assert_eq!(Amount(-at(-1)).to_string(), "3333.33333334");
        assert_eq!(Amount(-at(-2)).to_string(), "6666.66666667");
        assert_eq!(at(0), 0);
        assert_eq!(Amount(at(3)).to_string(), "10000.00000000");
    }

    #[test]
    fn a_hedged_book_is_charged_less_than_its_legs_and_contingencies_apply() {
        // A long call against a short future on the same underlying: the group's scanning risk is below the sum of
        // the legs' own; the offsetting long and short futures carry the futures contingency.
        let params = RiskParams::default();
        let t = 60.0 / 365.0;
        let mark = p("4500");
        let call = option_vector(&params, Right::Call, p("60000"), t, p("60000"), mark);
        assert!((call.sigma - implied_vol(Right::Call, 60_000.0, 60_000.0, t, 4_500.0)).abs() < 1e-15);
        let long_call = Leg::Option { qty: q("1"), vector: &call };
        let short_future = Leg::Linear { qty: q("-0.5"), mark: p("60000") };
        let alone_call = group_margin(&params, p("60000"), &[long_call]).unwrap();
        let alone_future = group_margin(&params, p("60000"), &[short_future]).unwrap();
        let both = group_margin(&params, p("60000"), &[long_call, short_future]).unwrap();
        assert!(both.scanning_risk.0 < alone_call.scanning_risk.0 + alone_future.scanning_risk.0);
        // A long option can lose at most its mark.
        assert!(alone_call.scanning_risk.0 <= Amount::units(4500).0);
        assert_eq!(alone_call.contingency, Amount::ZERO);
        // Short 2 calls: option contingency 0.01 × 60 000 × 2 = 1 200.
        let short_calls = group_margin(&params, p("60000"), &[Leg::Option { qty: q("-2"), vector: &call }]).unwrap();
        assert_eq!(short_calls.contingency.to_string(), "1200.00000000");
        // Long 3 and short 1 in two futures: future contingency 0.01 × 60 000 × min(3, 1) = 600.
        let spread = [Leg::Linear { qty: q("3"), mark: p("60100") }, Leg::Linear { qty: q("-1"), mark: p("59900") }];
        assert_eq!(group_margin(&params, p("60000"), &spread).unwrap().contingency.to_string(), "600.00000000");
    }

    #[test]
    fn a_short_straddle_loses_on_both_sides() {
        let params = RiskParams::default();
        let t = 20.0 / 365.0;
        let call = option_vector(&params, Right::Call, p("3000"), t, p("3000"), p("150"));
        let put = option_vector(&params, Right::Put, p("3000"), t, p("3000"), p("150"));
        let legs = [Leg::Option { qty: q("-1"), vector: &call }, Leg::Option { qty: q("-1"), vector: &put }];
        let pnls = scenario_pnls(&params, &legs).unwrap();
        let down = pnls[0];
        let up = pnls[24];
        assert!(down < 0 && up < 0, "{down} {up}");
        let g = group_margin(&params, p("3000"), &legs).unwrap();
        // The worst is a vol-up scenario at an edge of the grid.
        assert_eq!(g.worst.vol, VolCase::Up);
        assert!(g.worst.k.abs() == 4, "{:?}", g.worst);
        assert!(g.maintenance_margin.0 <= g.initial_margin.0);
    }

    #[test]
    fn linear_steps_equal_one_exact_division_per_step() {
        // Proves the split division gives mul_div's answer for every step, across signs and magnitudes (a
        // SplitMix-style sequence of exposures; an exposure whose product with the range needs the fallback).
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..2_000 {
            x ^= x >> 31;
            x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
            let magnitude = 1i128 << (i % 100);
            let exposure = (x as i64 as i128).wrapping_mul(magnitude) / 7;
            let range = Rate((x % 100_000_001) as i64);
            let buckets = 1 + (x % 20) as i32;
            let steps = LinearSteps::new(exposure, range, buckets);
            for k in -buckets..=buckets {
                let want =
                    mul_div(exposure, i128::from(range.0) * i128::from(k), i128::from(buckets) * SCALE2, Round::Floor);
                assert_eq!(steps.at(k), want, "exposure {exposure} range {range} buckets {buckets} k {k}");
            }
        }
        let huge = LinearSteps::new(i128::MAX / 3, Rate(SCALE), 4);
        assert!(huge.split.is_none());
        assert_eq!(huge.at(-4), mul_div(i128::MAX / 3, -4 * SCALE_I128, 4 * SCALE2, Round::Floor));
    }

    #[test]
    fn the_bounded_search_finds_the_scans_worst_scenario() {
        // Proves the float-bounded search returns exactly the full scan's first worst scenario: random groups of
        // perps and options (quantities and marks across magnitudes, deltas that tie, cancel, or sit a rounding
        // step apart, a non-finite delta), every bucket count, and groups of equal scenarios (only perps, or
        // nothing at all), where every scenario is a candidate.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut bounded = 0;
        for round in 0..4_000 {
            let buckets = 1 + (next() % 20) as u32;
            let params =
                RiskParams { buckets, price_range: Rate((next() % 100_000_001) as i64), ..RiskParams::default() };
            let n = params.scenario_count();
            let scale = [1e-9, 1e-3, 1.0, 1e3, 1e6, 1e9][(next() % 6) as usize];
            let vectors: Vec<OptionVector> = (0..(next() % 4))
                .map(|v| {
                    let base = (next() % 1000) as f64 * scale;
                    let deltas = (0..n)
                        .map(|i| match (round + v as usize) % 5 {
                            // Ties: the same value in every scenario, or in pairs.
                            0 => base,
                            1 => base * ((i / 2) as f64),
                            // A rounding step apart: values that floor to neighbours at 1e-8.
                            2 => base + (i % 3) as f64 * 0.4e-8,
                            _ => (next() % 2_000_001) as f64 * scale / 1e3 - scale,
                        })
                        .collect();
                    OptionVector { sigma: 0.5, deltas }
                })
                .collect();
            let mut legs: Vec<Leg<'_>> = vectors
                .iter()
                .map(|vector| Leg::Option { qty: Qty((next() % 2_000_000_001) as i64 - 1_000_000_000), vector })
                .collect();
            for _ in 0..(next() % 3) {
                let magnitude = [1, 1_000, 1_000_000, 1_000_000_000_000][(next() % 4) as usize];
                legs.push(Leg::Linear {
                    qty: Qty((next() % 2_000_001) as i64 * magnitude / 1000 - magnitude * 1000),
                    mark: Price((next() % 10_000_000_000_000) as i64),
                });
            }
            let (shape, options) = shape_and_sums(&params, &legs);
            let sums = Sums { shape: &shape, options: &options };
            let scan = sums.worst_by_scan(&params);
            if let Some(found) = sums.worst_by_bound(&params) {
                bounded += 1;
                assert_eq!(Some(found), scan, "round {round}: {legs:?} {params:?}");
            }
            assert_eq!(sums.worst(&params), scan, "round {round}");
        }
        assert!(bounded > 2_000, "the bound applied to only {bounded} groups");
        // A non-finite delta: the bound steps aside and the group cannot be formed, as before.
        let nan = OptionVector { sigma: 0.5, deltas: vec![f64::NAN; 27] };
        let legs = [Leg::Option { qty: Qty::units(1), vector: &nan }];
        let (shape, options) = shape_and_sums(&RiskParams::default(), &legs);
        let sums = Sums { shape: &shape, options: &options };
        assert_eq!(sums.worst_by_bound(&RiskParams::default()), None);
        assert_eq!(group_margin(&RiskParams::default(), p("100"), &legs), None);
    }

    #[test]
    fn the_fast_rounding_equals_floor_and_ceil() {
        // Proves the truncate-and-correct path gives exactly what floor/ceil give, at integers, halves, tiny
        // fractions either side of zero, and at the edge of the fast path.
        for x in
            [0.0, -0.0, 1e-9, -1e-9, 0.5e-8, -0.5e-8, 1.0, -1.0, 123.456_789_012_3, -123.456_789_012_3, 8.9e10, -8.9e10]
        {
            let scaled = x * 1e8;
            assert_eq!(float_to_e8(x, Round::Floor), Some(scaled.floor() as i128), "{x}");
            assert_eq!(float_to_e8(x, Round::Ceil), Some(scaled.ceil() as i128), "{x}");
        }
        assert_eq!(float_to_e8(1e12, Round::Floor), Some(100_000_000_000_000_000_000));
        assert_eq!(float_to_e8(f64::NAN, Round::Floor), None);
        assert_eq!(float_to_e8(f64::INFINITY, Round::Ceil), None);
    }

    #[test]
    fn parameters_out_of_bounds_are_refused() {
        assert!(RiskParams::default().check().is_ok());
        for bad in [
            RiskParams { buckets: 0, ..RiskParams::default() },
            RiskParams { buckets: 21, ..RiskParams::default() },
            RiskParams { price_range: r("1.1"), ..RiskParams::default() },
            RiskParams { vol_up: r("10.5"), ..RiskParams::default() },
            RiskParams { mm_factor: r("0"), ..RiskParams::default() },
            RiskParams { option_contingency: r("-0.01"), ..RiskParams::default() },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }

    /// [`linear_group_margin`] of `legs`.
    fn linear(params: &RiskParams, index: Price, legs: &[Leg<'_>]) -> Option<GroupMargin> {
        linear_group_margin(params, index, &LegTotals::of(leg_quantities(legs))?)
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(4096))]

        /// A group without options takes the shortcut only where the full search finds the same worst scenario, and
        /// then gives the same margin to the bit: one to three linear legs, long, short and hedged, every bucket
        /// count, price ranges from tiny (steps below a unit: no shortcut for a short exposure) to the largest.
        #[test]
        fn the_linear_shortcut_is_the_full_search(
            legs in proptest::collection::vec((-(1i64 << 40)..(1i64 << 40), 1i64..(1i64 << 46)), 1..4),
            buckets in 1u32..=20,
            range in 1i64..=100_000_000,
            index in 1i64..(1i64 << 46),
        ) {
            let params = RiskParams { buckets, price_range: Rate(range), ..RiskParams::default() };
            let legs: Vec<Leg<'_>> = legs.iter().map(|(q, m)| Leg::Linear { qty: Qty(*q), mark: Price(*m) }).collect();
            let shape = GroupShape::new(&params, &legs).unwrap();
            let full = group_margin_from(&params, Price(index), &shape, &vec![0.0; params.scenario_count()]);
            if let Some(short) = linear(&params, Price(index), &legs) {
                proptest::prop_assert_eq!(Some(short), full);
            }
            proptest::prop_assert_eq!(group_margin(&params, Price(index), &legs), full);
            proptest::prop_assert_eq!(linear_of(&params, Price(index), &legs), full);
        }
    }

    /// [`linear_group_margin_of`] of `legs` (all linear), added up leg by leg.
    fn linear_of(params: &RiskParams, index: Price, legs: &[Leg<'_>]) -> Option<GroupMargin> {
        let mut totals = LinearTotals::default();
        for leg in legs {
            let Leg::Linear { qty, mark } = leg else { panic!("an option leg") };
            totals.add(*qty, *mark)?;
        }
        linear_group_margin_of(params, index, &totals)
    }

    #[test]
    fn a_linear_group_whose_exposure_does_not_fit_is_not_formed_either_way() {
        let params = RiskParams::default();
        let big = Leg::Linear { qty: Qty(i64::MAX), mark: Price(i64::MAX) };
        // Three legs of nearly 2^126 each: their sum is beyond i128.
        assert_eq!(group_margin(&params, p("100"), &[big, big, big]), None);
        assert_eq!(linear_of(&params, p("100"), &[big, big, big]), None);
        assert!(linear_of(&params, p("100"), &[big]).is_some() == group_margin(&params, p("100"), &[big]).is_some());
    }

    #[test]
    fn the_linear_shortcut_leaves_small_short_steps_and_options_to_the_search() {
        let params = RiskParams::default();
        // A short of 1e-8 at 1e-8: E × R far below a unit a step.
        let tiny = [Leg::Linear { qty: Qty(-1), mark: Price(1) }];
        assert_eq!(linear(&params, Price(1), &tiny), None);
        // Long or flat: always the bottom step.
        let long = [Leg::Linear { qty: q("1"), mark: p("100") }];
        let m = linear(&params, p("100"), &long).unwrap();
        assert_eq!((m.worst.k, m.scanning_risk), (-4, Amount::parse("16").unwrap()));
        // Short by a unit or more a step: the top step.
        let short = [Leg::Linear { qty: q("-1"), mark: p("100") }];
        let m = linear(&params, p("100"), &short).unwrap();
        assert_eq!((m.worst.k, m.scanning_risk), (4, Amount::parse("16").unwrap()));
    }
}
