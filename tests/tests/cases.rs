//! The published worked examples (dYdX, Binance, Drift, BitMEX, Hyperliquid, Dederi's portfolio margin), run
//! through `vigil replay`'s code path with 1 and 4 shards and matched as `data/cases/README.md` says.

use std::fs;

use serde_json::Value;
use vigil_tests::{data_dir, replay_text};

fn dec(v: &Value) -> f64 {
    // Comparison within the case's tolerance only; the engine never uses floats.
    match v {
        Value::String(s) => s.parse().unwrap_or(f64::NAN),
        Value::Number(n) => n.as_str().parse().unwrap_or(f64::NAN),
        _ => f64::NAN,
    }
}

/// Checks every figure present in `expected` against `actual` (an object), recursing into keyed lists.
fn check_object(path: &str, expected: &Value, actual: &Value, tol: f64, errors: &mut Vec<String>) {
    let (Value::Object(exp), Value::Object(act)) = (expected, actual) else {
        errors.push(format!("{path}: expected an object"));
        return;
    };
    for (k, e) in exp {
        let p = format!("{path}.{k}");
        let Some(a) = act.get(k) else {
            errors.push(format!("{p}: missing in replay output"));
            continue;
        };
        match (k.as_str(), e) {
            // Lists keyed in the expectations: positions by symbol, portfolio groups by underlying.
            (list @ ("positions" | "groups"), Value::Object(by_key)) => {
                let key = if list == "positions" { "symbol" } else { "underlying" };
                for (name, ep) in by_key {
                    let found = a.as_array().and_then(|l| l.iter().find(|x| x[key] == name.as_str()));
                    match found {
                        Some(ap) => check_object(&format!("{p}.{name}"), ep, ap, tol, errors),
                        None => errors.push(format!("{p}.{name}: no such element of {list}")),
                    }
                }
            }
            (_, Value::Object(_)) => check_object(&p, e, a, tol, errors),
            (_, Value::Null) if !a.is_null() => errors.push(format!("{p}: expected null, got {a}")),
            (_, Value::Bool(b)) if a.as_bool() != Some(*b) => errors.push(format!("{p}: expected {b}, got {a}")),
            // Words (a margin model, a volatility case) compare as they are.
            (_, Value::String(w)) if dec(e).is_nan() && a.as_str() != Some(w.as_str()) => {
                errors.push(format!("{p}: expected {e}, got {a}"));
            }
            (_, Value::String(_)) if dec(e).is_nan() => {}
            (_, Value::String(_) | Value::Number(_)) => {
                let (x, y) = (dec(e), dec(a));
                let within = (x - y).abs() <= tol; // false for NaN: an unreadable figure fails
                if !within {
                    errors.push(format!("{p}: expected {e}, got {a}"));
                }
            }
            _ => {}
        }
    }
}

fn check_list(name: &str, expected: &Value, actual: &Value, tol: f64, errors: &mut Vec<String>) {
    let (Some(exp), Some(act)) = (expected.as_array(), actual.as_array()) else { return };
    if exp.len() != act.len() {
        errors.push(format!("{name}: expected {} elements, got {}: {actual}", exp.len(), act.len()));
        return;
    }
    for (i, (e, a)) in exp.iter().zip(act).enumerate() {
        for (k, v) in e.as_object().into_iter().flatten() {
            let same = match (v, &a[k]) {
                (Value::String(_) | Value::Number(_), x)
                    if !x.is_null() && k != "kind" && k != "reason" && k != "symbol" && k != "account" =>
                {
                    (dec(v) - dec(x)).abs() <= tol
                }
                (x, y) => x == y,
            };
            if !same {
                errors.push(format!("{name}[{i}].{k}: expected {v}, got {}", a[k]));
            }
        }
    }
}

fn check_case(name: &str, shards: usize) -> Vec<String> {
    let dir = data_dir().join("cases");
    let input = fs::read_to_string(dir.join(format!("{name}.jsonl"))).expect("case stream");
    let expected: Value = serde_json::from_str(
        &fs::read_to_string(dir.join(format!("{name}.expected.json"))).expect("case expectations"),
    )
    .expect("expectations are JSON");
    let doc: Value = serde_json::from_str(&replay_text(&input, shards)).expect("replay prints JSON");
    let tol = dec(&expected["tolerance"]);
    let mut errors = Vec::new();
    for (id, exp) in expected["accounts"].as_object().into_iter().flatten() {
        let acct = doc["accounts"].as_array().and_then(|l| l.iter().find(|a| a["account"] == id.as_str()));
        match acct {
            Some(a) => check_object(&format!("{name}/{id}"), exp, a, tol, &mut errors),
            None => errors.push(format!("{name}: account {id} missing")),
        }
    }
    if let Some(fund) = expected.get("insurance_fund") {
        check_object(&format!("{name}/insurance_fund"), fund, &doc["insurance_fund"], tol, &mut errors);
    }
    for list in ["triggers", "rejections"] {
        if let Some(e) = expected.get(list) {
            check_list(&format!("{name}/{list}"), e, &doc[list], 1e-9, &mut errors);
        }
    }
    if let Some(e) = expected.get("liquidations") {
        check_list(&format!("{name}/liquidations"), e, &doc["liquidations"], tol, &mut errors);
    }
    errors
}

fn case_names() -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(data_dir().join("cases"))
        .expect("cases directory")
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".jsonl")).map(str::to_owned))
        .collect();
    names.sort();
    names
}

#[test]
fn every_published_case_matches_with_1_and_4_shards() {
    // Proves replay reproduces each venue's published figures within the case's tolerance, whatever the shards.
    let names = case_names();
    assert!(names.len() >= 5, "the five published cases are bundled: {names:?}");
    let mut errors = Vec::new();
    for name in &names {
        for shards in [1, 4] {
            errors.extend(check_case(name, shards).into_iter().map(|e| format!("[{shards} shards] {e}")));
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

#[test]
fn bitmex_karen_full_document_matches() {
    // Proves the complete replay document of a case, every key and value, equals the published one.
    let dir = data_dir().join("cases");
    let input = fs::read_to_string(dir.join("bitmex_karen.jsonl")).expect("case");
    let expected: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("bitmex_karen.replay.json")).expect("doc")).expect("json");
    for shards in [1, 4] {
        let actual: Value = serde_json::from_str(&replay_text(&input, shards)).expect("json");
        assert_eq!(actual, expected, "{shards} shards");
    }
}

#[test]
fn the_bundled_example_replays() {
    // Proves the README's example stream exists and replays to a liquidation-free document with one account.
    let path = data_dir().join("../../examples/bitmex_karen.jsonl");
    let doc: Value = serde_json::from_str(&replay_text(&fs::read_to_string(path).expect("example"), 1)).expect("json");
    assert_eq!(doc["accounts"].as_array().map(Vec::len), Some(1));
}

#[test]
fn the_bundled_liquidation_example_gives_the_published_fund() {
    // Proves the README's liquidation example replays to liquidation.md's partial-close figures: fees 30 and
    // 41.925, the fund pays 5.00.
    let path = data_dir().join("../../examples/liquidations.jsonl");
    let doc: Value = serde_json::from_str(&replay_text(&fs::read_to_string(path).expect("example"), 2)).expect("json");
    let fund = &doc["insurance_fund"];
    assert_eq!((fund["balance"].as_str(), fund["paid"].as_str()), (Some("1066.92500000"), Some("5.00000000")));
    let fees: Vec<&str> =
        doc["liquidations"].as_array().expect("fills").iter().filter_map(|l| l["fee"].as_str()).collect();
    assert_eq!(fees, vec!["30.00000000", "41.92500000", "0.00000000"]);
}

#[test]
fn the_checker_detects_a_wrong_figure() {
    // Proves the case checker can fail: a tampered expectation is reported.
    let mut errors = Vec::new();
    let exp: Value = serde_json::json!({"equity": "1"});
    let act: Value = serde_json::json!({"equity": "2.00000000"});
    check_object("x", &exp, &act, 0.01, &mut errors);
    assert_eq!(errors.len(), 1);
}
