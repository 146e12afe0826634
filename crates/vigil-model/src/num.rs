//! Fixed-point numbers at 8 decimal places.
//!
//! Inputs (prices, quantities, rates, event amounts) are `i64` counts of 1e-8 units; money that accumulates
//! (balances, wallets, account figures) is `i128` at the same scale, and a position's cost basis is kept exactly
//! as `i128` at 1e-16 (the product of two 1e-8 numbers). Products are computed exactly and rounded once, in the
//! direction the margin model names; when an intermediate would not fit `i128` the computation widens to 256 bits
//! rather than overflow. Parsing and printing are exact: no value ever passes through `f64`.

use std::fmt;

use ethnum::I256;
use serde::{Deserialize, Serialize};

/// 10^8: one whole unit in raw fixed-point counts.
pub const SCALE: i64 = 100_000_000;
/// `SCALE` as `i128`, for products.
pub const SCALE_I128: i128 = SCALE as i128;
/// 10^16: the scale of a product of two fixed-point numbers.
pub const SCALE2: i128 = SCALE_I128 * SCALE_I128;
/// Decimal places kept.
pub const DECIMALS: u32 = 8;

/// Rounding direction of a division.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Round {
    /// Toward negative infinity: credits to an account, collateral value, unrealized PnL.
    Floor,
    /// Toward positive infinity: margin requirements.
    Ceil,
    /// To nearest, ties away from zero: reported prices.
    Nearest,
}

/// The step a truncated quotient takes to round as asked, given the sign of the dropped fraction and whether its
/// magnitude is at least one half. Shared by the 128- and 256-bit divisions.
fn round_step(round: Round, frac_positive: bool, at_least_half: bool) -> i8 {
    match (round, frac_positive) {
        (Round::Floor, false) => -1,
        (Round::Ceil, true) => 1,
        (Round::Nearest, true) if at_least_half => 1,
        (Round::Nearest, false) if at_least_half => -1,
        _ => 0,
    }
}

/// `n / d` and its remainder for a divisor `d` with `m = floor(2^128 / d)`, by Barrett reduction: `n × m / 2^128`
/// (the top half of a 256-bit product, from four 64-bit multiplications) is the quotient or one less, because it
/// falls short of `n / d` by `n × (2^128 / d − m) / 2^128 < 1`; one compare corrects it. No division instruction and
/// no library call (a 128-bit division is one, several times slower, and dividing by 1e8 or 1e16 is what every
/// figure does once or twice). `n ≤ 2^127` (a magnitude of an `i128`), which keeps every partial sum in 128 bits.
const fn divrem_barrett(n: u128, d: u128, m: u128) -> (u128, u128) {
    let (n1, n0) = (n >> 64, n & (u64::MAX as u128));
    let (m1, m0) = (m >> 64, m & (u64::MAX as u128));
    // n1 ≤ 2^63 and m1 < 2^38 (d ≥ 1e8): n1 × m0 < 2^127, n0 × m1 < 2^102, so the sum fits.
    let mid = n1 * m0 + n0 * m1 + ((n0 * m0) >> 64);
    let q = n1 * m1 + (mid >> 64);
    let r = n - q * d;
    if r >= d { (q + 1, r - d) } else { (q, r) }
}

/// `floor(2^128 / d)`, computed as `(2^128 − 1) / d` (the same unless `d` divides 2^128, which 1e8 and 1e16 do not).
const fn reciprocal(d: u128) -> u128 {
    u128::MAX / d
}

const E8: u128 = SCALE as u128;
const E16: u128 = E8 * E8;
const M_E8: u128 = reciprocal(E8);
const M_E16: u128 = reciprocal(E16);

/// `n / d` for `d` = 1e8 or 1e16 (`m` its [`reciprocal`]), rounded as asked: the quotient always exists, and rounding
/// it one step cannot overflow (|n| / 1e8 + 1 ≤ |n| whenever the remainder is not zero).
///
/// Rounded down or up, without a branch on `n`'s sign (a value's sign is a coin toss to the branch predictor: longs
/// and shorts alike): `⌊n / d⌋ = −⌊(|n| + d − 1) / d⌋` for a negative `n`, `⌈n / d⌉ = ⌊(n + d − 1) / d⌋` for a
/// positive one, the sign applied after by masks. Only an `|n|` within `d` of 2^127 takes the general path (the
/// Barrett step's dividend stays at most 2^127).
#[inline(always)]
fn div_scale(n: i128, d: u128, m: u128, round: Round) -> i128 {
    if matches!(round, Round::Floor | Round::Ceil) {
        let a = n.unsigned_abs();
        if a <= (1u128 << 127) - (d - 1) {
            // All ones for a negative n, else zero.
            let negative = (n >> 127) as u128;
            let up = if matches!(round, Round::Floor) { negative } else { !negative };
            let (q, _) = divrem_barrett(a + ((d - 1) & up), d, m);
            // q < 2^127 / 1e8: negated by the mask (two's complement), it fits.
            return (q ^ negative).wrapping_sub(negative) as i128;
        }
    }
    let (q, r) = divrem_barrett(n.unsigned_abs(), d, m);
    // |n| ≤ 2^127, so q < 2^127 / 1e8 fits; the truncated quotient and remainder take n's sign.
    let q = if n < 0 { -(q as i128) } else { q as i128 };
    if r == 0 {
        return q;
    }
    q + i128::from(round_step(round, n > 0, 2 * r >= d))
}

/// `n / d` rounded as asked; `None` if `d == 0` or the quotient overflows.
#[inline]
fn div_round_i128(n: i128, d: i128, round: Round) -> Option<i128> {
    if d == SCALE_I128 {
        return Some(div_scale(n, E8, M_E8, round));
    }
    if d == SCALE2 {
        return Some(div_scale(n, E16, M_E16, round));
    }
    div_round_general(n, d, round)
}

fn div_round_general(n: i128, d: i128, round: Round) -> Option<i128> {
    if d == 0 {
        return None;
    }
    let q = n.checked_div(d)?;
    // Exact: |q × d| ≤ |n|. (One division, not a second for the remainder.)
    let r = n - q * d;
    if r == 0 {
        return Some(q);
    }
    // Exact quotient is q + r/d with |r/d| < 1; the sign of the fraction is sign(r) * sign(d).
    let half = r.unsigned_abs().checked_mul(2).is_none_or(|twice| twice >= d.unsigned_abs());
    q.checked_add(i128::from(round_step(round, (r > 0) == (d > 0), half)))
}

/// `a × b` if it fits `i128`. When the operands' magnitudes have 129 or more leading zero bits between them the
/// product is below 2^127 and fits, which two bit counts tell: the common case skips `checked_mul`'s full
/// overflow test (a library call for `i128`).
#[inline(always)]
pub fn checked_mul(a: i128, b: i128) -> Option<i128> {
    if a.unsigned_abs().leading_zeros() + b.unsigned_abs().leading_zeros() >= 129 {
        return Some(a.wrapping_mul(b));
    }
    a.checked_mul(b)
}

fn div_round_i256(n: I256, d: I256, round: Round) -> Option<I256> {
    if d == I256::ZERO {
        return None;
    }
    let (q, r) = (n / d, n % d);
    if r == I256::ZERO {
        return Some(q);
    }
    let half = r.unsigned_abs() * 2 >= d.unsigned_abs();
    Some(q + I256::from(round_step(round, (r > I256::ZERO) == (d > I256::ZERO), half)))
}

/// `a × b / d`, rounded once. Exact for every `i128` input; `None` only if `d == 0` or the result does not fit.
#[inline]
pub fn mul_div(a: i128, b: i128, d: i128, round: Round) -> Option<i128> {
    if let Some(p) = checked_mul(a, b) {
        return div_round_i128(p, d, round);
    }
    let p = I256::from(a) * I256::from(b);
    let q = div_round_i256(p, I256::from(d), round)?;
    i128::try_from(q).ok()
}

/// `n / d` for 256-bit operands, rounded once; `None` if `d == 0` or the quotient does not fit `i128`.
pub fn div_wide(n: I256, d: I256, round: Round) -> Option<i128> {
    div_round_i256(n, d, round).and_then(|q| i128::try_from(q).ok())
}

/// `n / d` rounded once; `None` if `d == 0`.
#[inline]
pub fn div(n: i128, d: i128, round: Round) -> Option<i128> {
    div_round_i128(n, d, round)
}

/// A raw 1e-16 product rounded to 1e-8.
#[inline]
pub fn e16_to_e8(n: i128, round: Round) -> i128 {
    div_scale(n, E8, M_E8, round)
}

macro_rules! fixed64 {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub i64);

        impl $name {
            pub const ZERO: Self = Self(0);
            pub const ONE: Self = Self(SCALE);
            /// Raw count of 1e-8 units.
            pub const fn raw(self) -> i64 {
                self.0
            }
            /// The value as an `i128` raw count, for products.
            pub const fn wide(self) -> i128 {
                self.0 as i128
            }
            /// Whole units, for tests and generators.
            pub const fn units(n: i64) -> Self {
                Self(n * SCALE)
            }
            /// Parses a decimal text exactly.
            pub fn parse(text: &str) -> Result<Self, NumError> {
                parse_fixed(text).and_then(|v| i64::try_from(v).map(Self).map_err(|_| NumError::OutOfRange))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_fixed(f, self.0 as i128)
            }
        }
    };
}

fixed64!(
    /// A price in quote units per unit of the instrument or asset.
    Price
);
fixed64!(
    /// A quantity of an instrument, signed for positions (short < 0).
    Qty
);
fixed64!(
    /// A rate: margin fractions, haircuts, funding rates.
    Rate
);

/// An amount of money (quote or asset units) at 1e-8, wide enough to accumulate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Amount(pub i128);

impl Amount {
    pub const ZERO: Self = Self(0);
    pub const MAX: Self = Self(i128::MAX);
    pub const MIN: Self = Self(i128::MIN);
    pub const fn raw(self) -> i128 {
        self.0
    }
    pub const fn units(n: i64) -> Self {
        Self(n as i128 * SCALE_I128)
    }
    pub fn parse(text: &str) -> Result<Self, NumError> {
        // Event amounts are bounded like every other input number.
        parse_fixed(text).and_then(|v| i64::try_from(v).map(|x| Self(x as i128)).map_err(|_| NumError::OutOfRange))
    }
    pub fn checked_add(self, o: Self) -> Option<Self> {
        self.0.checked_add(o.0).map(Self)
    }
    pub fn checked_sub(self, o: Self) -> Option<Self> {
        self.0.checked_sub(o.0).map(Self)
    }
    pub fn saturating_add(self, o: Self) -> Self {
        Self(self.0.saturating_add(o.0))
    }
    pub fn saturating_sub(self, o: Self) -> Self {
        Self(self.0.saturating_sub(o.0))
    }
    pub fn is_negative(self) -> bool {
        self.0 < 0
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_fixed(f, self.0)
    }
}

/// Why a decimal text is not an acceptable number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NumError {
    /// Not a decimal at all (including NaN, infinity, empty text).
    Syntax,
    /// More than 8 significant decimal places.
    TooPrecise,
    /// Outside the representable range (|x| ≥ 2^63 × 1e-8).
    OutOfRange,
}

impl fmt::Display for NumError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NumError::Syntax => "not a decimal number",
            NumError::TooPrecise => "more than 8 decimal places",
            NumError::OutOfRange => "out of range (|x| must be below 92233720368.54775808)",
        })
    }
}

/// Parses `-?digits[.digits][(e|E)[+-]digits]` exactly into a raw 1e-8 count. Trailing zeros past the 8th place
/// are accepted (they round nothing); any other digit there is [`NumError::TooPrecise`].
pub fn parse_fixed(text: &str) -> Result<i128, NumError> {
    let bytes = text.as_bytes();
    let mut i = 0;
    let negative = match bytes.first() {
        Some(b'-') => {
            i = 1;
            true
        }
        _ => false,
    };
    let int_start = i;
    while i < bytes.len() && bytes[i].is_ascii_digit() {
        i += 1;
    }
    let int_digits = &bytes[int_start..i];
    let mut frac_digits: &[u8] = &[];
    if i < bytes.len() && bytes[i] == b'.' {
        i += 1;
        let s = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        frac_digits = &bytes[s..i];
        if frac_digits.is_empty() {
            return Err(NumError::Syntax);
        }
    }
    if int_digits.is_empty() {
        return Err(NumError::Syntax);
    }
    let mut exponent: i64 = 0;
    if i < bytes.len() && (bytes[i] == b'e' || bytes[i] == b'E') {
        i += 1;
        let mut exp_negative = false;
        if i < bytes.len() && (bytes[i] == b'+' || bytes[i] == b'-') {
            exp_negative = bytes[i] == b'-';
            i += 1;
        }
        let s = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            // Saturate: any exponent this large is out of range or too precise anyway.
            exponent = (exponent * 10 + i64::from(bytes[i] - b'0')).min(1_000_000);
            i += 1;
        }
        if s == i {
            return Err(NumError::Syntax);
        }
        if exp_negative {
            exponent = -exponent;
        }
    }
    if i != bytes.len() {
        return Err(NumError::Syntax);
    }
    // All digits as one sequence with the decimal point after `point` digits, shifted by the exponent.
    let point = int_digits.len() as i64 + exponent;
    let digits = int_digits.iter().chain(frac_digits.iter());
    let mut raw: i128 = 0;
    for (pos, &d) in digits.enumerate() {
        let v = i128::from(d - b'0');
        // Place of this digit relative to the point: 1e-8 is place `point + 8 - 1` from the start.
        let place = pos as i64;
        if place >= point + i64::from(DECIMALS) {
            if v != 0 {
                return Err(NumError::TooPrecise);
            }
            continue;
        }
        raw = raw.checked_mul(10).ok_or(NumError::OutOfRange)?;
        raw = raw.checked_add(v).ok_or(NumError::OutOfRange)?;
        if raw > i128::from(i64::MAX) + 1 {
            return Err(NumError::OutOfRange);
        }
    }
    // Scale up for the places between the last digit and 1e-8.
    let total = int_digits.len() as i64 + frac_digits.len() as i64;
    let missing = (point + i64::from(DECIMALS) - total).max(0);
    for _ in 0..missing {
        if raw == 0 {
            break;
        }
        raw = raw.checked_mul(10).ok_or(NumError::OutOfRange)?;
        if raw > i128::from(i64::MAX) + 1 {
            return Err(NumError::OutOfRange);
        }
    }
    let value = if negative { -raw } else { raw };
    if value > i128::from(i64::MAX) || value < -i128::from(i64::MAX) {
        return Err(NumError::OutOfRange);
    }
    Ok(value)
}

/// Writes a raw 1e-8 count with exactly 8 decimal places and no exponent.
pub fn write_fixed(f: &mut impl fmt::Write, raw: i128) -> fmt::Result {
    let sign = if raw < 0 { "-" } else { "" };
    let abs = raw.unsigned_abs();
    let scale = SCALE as u128;
    write!(f, "{sign}{}.{:08}", abs / scale, abs % scale)
}

/// A raw 1e-8 count as text with 8 decimal places.
pub fn format_fixed(raw: i128) -> String {
    let mut s = String::with_capacity(24);
    // Writing to a String cannot fail.
    let _ = write_fixed(&mut s, raw);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A xorshift64 sequence from `seed` (test inputs).
    fn xorshift(mut x: u64) -> impl FnMut() -> u64 {
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    /// The plain division the fast paths replace.
    fn div_round_reference(n: i128, d: i128, round: Round) -> i128 {
        let (q, r) = (n / d, n % d);
        if r == 0 {
            return q;
        }
        q + i128::from(round_step(round, (r > 0) == (d > 0), r.unsigned_abs() * 2 >= d.unsigned_abs()))
    }

    #[test]
    fn barrett_reduction_matches_plain_division() {
        // Proves the quotient and remainder by 1e8 and 1e16 equal u128's own division over the whole domain
        // (0 to 2^127): the ends, every power of two and its neighbours, multiples of the divisor and their
        // neighbours up to the top, and random values of every magnitude.
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        let top = 1u128 << 127;
        let mut cases = vec![0u128, 1, top, top - 1, u64::MAX as u128, u64::MAX as u128 + 1];
        for bit in 0..127 {
            let p = 1u128 << bit;
            cases.extend([p - 1, p, p + 1]);
        }
        for d in [E8, E16] {
            for k in [1u128, 2, 3, 1 << 20, 1 << 50, 1 << 64, top / d - 1, top / d] {
                for off in [0u128, 1, d / 2, d - 1] {
                    cases.extend([k * d + off, (k * d).saturating_sub(off + 1)]);
                }
            }
        }
        for _ in 0..200_000 {
            let bits = next() % 128;
            cases.push(((u128::from(next()) << 64 | u128::from(next())) >> (127 - bits)).min(top));
        }
        // The domain ends at 2^127 (the largest |i128|); the neighbours of the top multiples past it are left out.
        cases.retain(|n| *n <= top);
        assert!(cases.len() > 200_000 && cases.contains(&top));
        for n in cases {
            assert_eq!(divrem_barrett(n, E8, M_E8), (n / E8, n % E8), "{n} / 1e8");
            assert_eq!(divrem_barrett(n, E16, M_E16), (n / E16, n % E16), "{n} / 1e16");
        }
    }

    #[test]
    fn checked_mul_matches_the_standard_one() {
        // The leading-zeros shortcut must give `i128::checked_mul`'s answer everywhere: at the powers of two
        // around the 129-bit boundary (both signs, i128::MIN included) and for random operands of every size.
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        let mut values = vec![0i128, 1, -1, i128::MAX, i128::MIN, i128::MIN + 1];
        for bit in 0..127 {
            let p = 1i128 << bit;
            values.extend([p - 1, p, p + 1, -p + 1, -p, -p - 1]);
        }
        for _ in 0..2_000 {
            let bits = next() % 128;
            let v = ((u128::from(next()) << 64 | u128::from(next())) >> (127 - bits)) as i128;
            values.extend([v, -v]);
        }
        let mut fast = 0;
        for (i, a) in values.iter().enumerate() {
            for b in values.iter().skip(i % 7).step_by(7) {
                assert_eq!(checked_mul(*a, *b), a.checked_mul(*b), "{a} × {b}");
                fast += usize::from(a.unsigned_abs().leading_zeros() + b.unsigned_abs().leading_zeros() >= 129);
            }
        }
        // Both paths were taken many times.
        assert!(fast > 10_000, "{fast}");
    }

    #[test]
    fn division_by_the_scales_matches_plain_division() {
        // Proves the Barrett fast paths for 1e8 and 1e16 give the quotient and rounding of a plain i128
        // division: at the extremes, around multiples and halves of the divisor, and over random values of every
        // magnitude, in the three rounding modes.
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        let mut cases = vec![0, 1, -1, i128::MAX, i128::MIN, i128::MAX - 1, i128::MIN + 1];
        for d in [SCALE_I128, SCALE2] {
            // Around where rounding down or up without a branch hands over to the general path (|n| > 2^127 − d + 1).
            for off in [-1, 0, 1, 2] {
                let n = i128::MAX - d + off;
                cases.extend([n, -n]);
            }
            for k in [1i128, 2, 3, 1 << 40, 1 << 90] {
                for off in [-1, 0, 1, d / 2 - 1, d / 2, d / 2 + 1] {
                    if let Some(n) = k.checked_mul(d).and_then(|m| m.checked_add(off)) {
                        cases.extend([n, -n]);
                    }
                }
            }
        }
        for _ in 0..20_000 {
            let bits = next() % 127;
            let v = ((u128::from(next()) << 64 | u128::from(next())) >> (127 - bits)) as i128;
            cases.push(if next().is_multiple_of(2) { v } else { -v });
        }
        for n in cases {
            for d in [SCALE_I128, SCALE2] {
                for round in [Round::Floor, Round::Ceil, Round::Nearest] {
                    assert_eq!(
                        div_round_i128(n, d, round),
                        Some(div_round_reference(n, d, round)),
                        "{n} / {d} {round:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn parse_accepts_exact_forms() {
        // Proves the accepted grammar maps to the exact raw count.
        assert_eq!(parse_fixed("0"), Ok(0));
        assert_eq!(parse_fixed("-12.5"), Ok(-1_250_000_000));
        assert_eq!(parse_fixed("0.00000001"), Ok(1));
        assert_eq!(parse_fixed("1.000000000"), Ok(SCALE_I128));
        assert_eq!(parse_fixed("1e3"), Ok(1000 * SCALE_I128));
        assert_eq!(parse_fixed("1.5E-3"), Ok(150_000));
        assert_eq!(parse_fixed("25e-9"), Err(NumError::TooPrecise));
        assert_eq!(parse_fixed("92233720368.54775807"), Ok(i128::from(i64::MAX)));
        assert_eq!(parse_fixed("-92233720368.54775807"), Ok(-i128::from(i64::MAX)));
    }

    #[test]
    fn parse_rejects_bad_text() {
        // Proves every malformed, too precise or too large text is refused with its own error.
        for bad in ["", "-", ".5", "5.", "1e", "NaN", "inf", "+1", " 1", "1 ", "0x10", "1_000", "--1", "1.2.3"] {
            assert_eq!(parse_fixed(bad), Err(NumError::Syntax), "{bad:?}");
        }
        assert_eq!(parse_fixed("0.123456789"), Err(NumError::TooPrecise));
        assert_eq!(parse_fixed("1e400"), Err(NumError::OutOfRange));
        assert_eq!(parse_fixed("1e-400"), Err(NumError::TooPrecise));
        assert_eq!(parse_fixed("0e400"), Ok(0));
        assert_eq!(parse_fixed("92233720368.54775808"), Err(NumError::OutOfRange));
        assert_eq!(parse_fixed("99999999999999999999999999999999999999999"), Err(NumError::OutOfRange));
    }

    #[test]
    fn format_is_fixed_eight_places() {
        // Proves printing is exact, signed and never uses an exponent.
        assert_eq!(format_fixed(0), "0.00000000");
        assert_eq!(format_fixed(-1), "-0.00000001");
        assert_eq!(format_fixed(123_456_789_012), "1234.56789012");
    }

    #[test]
    fn rounding_directions() {
        // Proves floor, ceil and nearest on both signs, and the 256-bit path.
        assert_eq!(div(7, 2, Round::Floor), Some(3));
        assert_eq!(div(-7, 2, Round::Floor), Some(-4));
        assert_eq!(div(7, 2, Round::Ceil), Some(4));
        assert_eq!(div(-7, 2, Round::Ceil), Some(-3));
        assert_eq!(div(7, 2, Round::Nearest), Some(4));
        assert_eq!(div(-7, 2, Round::Nearest), Some(-4));
        assert_eq!(div(7, -3, Round::Nearest), Some(-2));
        assert_eq!(div(5, 3, Round::Nearest), Some(2));
        let big = i128::MAX / 3;
        assert_eq!(mul_div(big, 6, 3, Round::Floor), Some(big * 2));
        assert_eq!(mul_div(big, 10, 3, Round::Floor), None);
        assert_eq!(mul_div(-big, 6, -4, Round::Ceil), mul_div(big, 3, 2, Round::Ceil));
    }

    proptest::proptest! {
        #[test]
        fn parse_agrees_with_rust_decimal(raw in -i64::MAX..=i64::MAX) {
            // Proves print → parse round-trips, and agrees with rust_decimal's reading of the same text.
            let text = format_fixed(i128::from(raw));
            proptest::prop_assert_eq!(parse_fixed(&text), Ok(i128::from(raw)));
            let d: rust_decimal::Decimal = text.parse().map_err(|e| proptest::test_runner::TestCaseError::fail(format!("{e}")))?;
            proptest::prop_assert_eq!(d.mantissa(), i128::from(raw));
            proptest::prop_assert_eq!(d.scale(), 8);
        }

        #[test]
        fn mul_div_matches_wide_reference(a in proptest::num::i128::ANY, b in -1_000_000_000_000i128..1_000_000_000_000, d in 1i128..1_000_000_000_000_000_000) {
            // Proves the i128 fast path and the 256-bit path give the floor of the exact quotient.
            let exact = I256::from(a) * I256::from(b);
            let q = exact.div_euclid(I256::from(d));
            let expect = i128::try_from(q).ok();
            proptest::prop_assert_eq!(mul_div(a, b, d, Round::Floor), expect);
        }
    }
}
