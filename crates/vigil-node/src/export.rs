//! `vigil export`: the book at one offset (instruments, prices, accounts, balances, positions) as CSV files with a
//! header row, for analysts and for reconciliation with other tools. Columns: `docs/events.md`, "Exporting the
//! book". Decimals print as in the replay document (8 places, no exponent); fields are quoted per RFC 4180 only
//! where they need it.

use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use anyhow::Context;
use vigil_engine::market::{Entry, InstrumentKind};
use vigil_engine::merged_views;
use vigil_model::{Offset, Right};

use crate::book::Book;

/// What an export wrote: the offset of the book, and the rows of each file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exported {
    pub offset: Offset,
    pub files: Vec<(&'static str, usize)>,
}

/// A CSV field: as is, or quoted (quotes doubled) when it holds a comma, a quote or a line break.
fn field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_owned() }
}

fn write_csv(
    dir: &Path,
    name: &'static str,
    header: &str,
    rows: &[Vec<String>],
) -> anyhow::Result<(&'static str, usize)> {
    let path = dir.join(name);
    let mut out = BufWriter::new(fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?);
    writeln!(out, "{header}")?;
    for row in rows {
        let line: Vec<String> = row.iter().map(|f| field(f)).collect();
        writeln!(out, "{}", line.join(","))?;
    }
    out.flush().with_context(|| format!("writing {}", path.display()))?;
    Ok((name, rows.len()))
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|x| x.to_string()).unwrap_or_default()
}

/// Writes `book` into `dir` (created if missing).
pub fn export(book: &Book, dir: &Path) -> anyhow::Result<Exported> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let shard = book.engines.first().context("a book has at least one shard")?;
    let market = shard.market();
    let (mut instruments, mut prices) = (Vec::new(), Vec::new());
    for slot in 0..market.slots() as u32 {
        let name = market.name(slot).to_owned();
        let kind = match market.entry(slot) {
            Some(Entry::Quote) => "quote",
            Some(Entry::Asset { .. }) => "asset",
            Some(Entry::Instrument(_)) => "instrument",
            None => continue,
        };
        if let Some(p) = market.price(slot) {
            prices.push(vec![name.clone(), kind.to_owned(), p.to_string()]);
        }
        if let Some(i) = market.instrument(slot) {
            let (kind, right, strike) = match &i.kind {
                InstrumentKind::Perp => ("perp", String::new(), String::new()),
                InstrumentKind::Future => ("future", String::new(), String::new()),
                InstrumentKind::Option { terms, .. } => (
                    "option",
                    if terms.right == Right::Call { "call" } else { "put" }.to_owned(),
                    terms.strike.to_string(),
                ),
            };
            instruments.push(vec![
                name,
                kind.to_owned(),
                i.underlying.map(|u| market.name(u).to_owned()).unwrap_or_default(),
                right,
                strike,
                opt(i.expiry.map(|t| t.0)),
                i.settled.to_string(),
            ]);
        }
    }
    let views = merged_views(&book.engines);
    let (mut accounts, mut balances, mut positions) = (Vec::new(), Vec::new(), Vec::new());
    for v in &views {
        accounts.push(vec![
            v.account.clone(),
            v.margin.as_str().to_owned(),
            v.equity.to_string(),
            v.initial_margin.to_string(),
            v.maintenance_margin.to_string(),
            v.available.to_string(),
            v.liquidatable.to_string(),
        ]);
        for (asset, amount) in &v.balances {
            balances.push(vec![v.account.clone(), asset.clone(), amount.to_string()]);
        }
        for p in &v.positions {
            positions.push(vec![
                v.account.clone(),
                p.symbol.clone(),
                p.qty.to_string(),
                opt(p.entry_price),
                opt(p.mark_price),
                p.unrealized_pnl.to_string(),
                p.margin_mode.as_str().to_owned(),
                opt(p.isolated_wallet),
            ]);
        }
    }
    let offset = book.offset;
    let mut files = vec![
        write_csv(dir, "instruments.csv", "symbol,kind,underlying,right,strike,expiry_ns,settled", &instruments)?,
        write_csv(dir, "prices.csv", "name,kind,price", &prices)?,
        write_csv(
            dir,
            "accounts.csv",
            "account,margin,equity,initial_margin,maintenance_margin,available,liquidatable",
            &accounts,
        )?,
        write_csv(dir, "balances.csv", "account,asset,amount", &balances)?,
        write_csv(
            dir,
            "positions.csv",
            "account,symbol,qty,entry_price,mark_price,unrealized_pnl,margin_mode,isolated_wallet",
            &positions,
        )?,
    ];
    let manifest: Vec<Vec<String>> =
        files.iter().map(|(name, rows)| vec![(*name).to_owned(), rows.to_string(), offset.0.to_string()]).collect();
    files.push(write_csv(dir, "manifest.csv", "file,rows,offset", &manifest)?);
    Ok(Exported { offset, files })
}

/// Prints what an export wrote.
pub fn print(exported: &Exported, dir: &Path, out: &mut impl Write) -> io::Result<()> {
    writeln!(out, "book at offset {} written to {}:", exported.offset.0, dir.display())?;
    for (name, rows) in &exported.files {
        writeln!(out, "  {name}: {rows} rows")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_book_is_exported_with_headers_and_quoted_names() {
        // Proves each file's header and rows, decimals at 8 places, a name with a comma quoted, rejected lines
        // taking their offset, and the manifest naming the offset.
        let input = [
            r#"{"type":"asset","asset":"BTC"}"#,
            r#"{"type":"perp","symbol":"BTC-PERP","underlying":"BTC","tiers":[{"imr":"0.1","mmr":"0.05"}]}"#,
            r#"{"type":"option","symbol":"BTC-C","underlying":"BTC","right":"call","strike":"70000","expiry":"2027-03-26T08:00:00Z"}"#,
            r#"{"type":"price","symbol":"BTC","price":"60000"}"#,
            r#"{"type":"price","symbol":"BTC-PERP","price":"60010"}"#,
            "not json",
            r#"{"type":"deposit","account":"a,\"b\"","asset":"USDC","amount":"1000"}"#,
            r#"{"type":"trade","account":"a,\"b\"","symbol":"BTC-PERP","side":"sell","qty":"0.5","price":"60000"}"#,
        ]
        .join("\n");
        let dir = tempfile::tempdir().unwrap();
        // Two shards: the book is the same for every shard count.
        let book = crate::book::replay(input.as_bytes(), &vigil_engine::Config::default(), 2, false).unwrap();
        let e = export(&book, dir.path()).unwrap();
        assert_eq!(e.offset, Offset(8));
        let read = |n: &str| fs::read_to_string(dir.path().join(n)).unwrap();
        assert_eq!(
            read("instruments.csv"),
            "symbol,kind,underlying,right,strike,expiry_ns,settled\nBTC-PERP,perp,BTC,,,,false\n\
             BTC-C,option,BTC,call,70000.00000000,1806048000000000000,false\n"
        );
        assert_eq!(
            read("prices.csv"),
            "name,kind,price\nUSDC,quote,1.00000000\nBTC,asset,60000.00000000\nBTC-PERP,instrument,60010.00000000\n"
        );
        assert_eq!(
            read("positions.csv"),
            "account,symbol,qty,entry_price,mark_price,unrealized_pnl,margin_mode,isolated_wallet\n\
             \"a,\"\"b\"\"\",BTC-PERP,-0.50000000,60000.00000000,60010.00000000,-5.00000000,cross,\n"
        );
        assert_eq!(read("balances.csv"), "account,asset,amount\n\"a,\"\"b\"\"\",USDC,1000.00000000\n");
        assert!(read("accounts.csv").starts_with("account,margin,equity,initial_margin,"));
        assert!(read("manifest.csv").contains("positions.csv,1,8\n"), "{}", read("manifest.csv"));
    }
}
