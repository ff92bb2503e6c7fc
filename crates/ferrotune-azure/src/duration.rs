//! Durations as the user writes them (`600s`, `10m`, `1h30m`, `90`) and as ARM wants them
//! (ISO 8601: `PT10M`, `PT1M30S`).

use std::time::Duration;

use crate::error::{AzureError, Result};

pub fn parse(text: &str) -> Result<Duration> {
    let t = text.trim();
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let bad = || {
        AzureError::Usage(format!(
            "`{text}`: expected a duration such as 90s, 10m, 1h30m or 600"
        ))
    };
    let mut total = 0u64;
    let mut number = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: u64 = number.parse().map_err(|_| bad())?;
        number.clear();
        total += n * match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return Err(bad()),
        };
    }
    if !number.is_empty() {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

pub fn iso8601(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return "PT0S".into();
    }
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::from("PT");
    if h > 0 {
        out.push_str(&format!("{h}H"));
    }
    if m > 0 {
        out.push_str(&format!("{m}M"));
    }
    if s > 0 {
        out.push_str(&format!("{s}S"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sources_settings_become_iso_durations() {
        assert_eq!(iso8601(parse("600s").unwrap()), "PT10M");
        assert_eq!(iso8601(parse("90s").unwrap()), "PT1M30S");
        assert_eq!(iso8601(parse("1h30m").unwrap()), "PT1H30M");
        assert_eq!(iso8601(parse("5").unwrap()), "PT5S");
        assert!(parse("ten minutes").unwrap_err().is_usage());
        assert!(parse("10x").is_err() && parse("3m2").is_err());
    }
}
