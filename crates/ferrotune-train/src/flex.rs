//! Lenient scalar parsing for config values: Azure ML passes every pipeline parameter as a
//! string (`apply_lora: "true"`, `deepspeed_stage: "2"`), so a number or boolean may arrive
//! quoted. Anything else is an error saying what was expected and what came.

use std::fmt::Display;
use std::str::FromStr;

use serde::de::{Deserialize, Deserializer, Error};
use serde_yaml_ng::Value;

fn kind(v: &Value) -> String {
    match v {
        Value::Null => "nothing (null)".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("\"{s}\""),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(_) => "a tagged value".into(),
    }
}

fn number_from<T: FromStr>(v: &Value, what: &str) -> Result<T, String>
where
    T::Err: Display,
{
    let text = match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.trim().to_string(),
        other => return Err(format!("expected {what}, got {}", kind(other))),
    };
    text.parse::<T>()
        .map_err(|e| format!("expected {what}, got {} ({e})", kind(v)))
}

fn expected<T>() -> &'static str {
    match std::any::type_name::<T>() {
        "f64" | "f32" => "a number",
        "i64" | "i32" => "a whole number",
        _ => "a whole number >= 0",
    }
}

/// A boolean, or the strings `true`/`false` (any case).
pub fn bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    let v = Value::deserialize(d)?;
    match &v {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if s.trim().eq_ignore_ascii_case("true") => Ok(true),
        Value::String(s) if s.trim().eq_ignore_ascii_case("false") => Ok(false),
        other => Err(D::Error::custom(format!(
            "expected true or false, got {}",
            kind(other)
        ))),
    }
}

/// A number, or a string holding one.
pub fn num<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: Display,
{
    let v = Value::deserialize(d)?;
    number_from(&v, expected::<T>()).map_err(D::Error::custom)
}

/// An optional number (`null`, `""` or absent = none).
pub fn opt_num<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: Display,
{
    let v = Value::deserialize(d)?;
    match &v {
        Value::Null => Ok(None),
        Value::String(s) if s.trim().is_empty() || s.trim() == "null" => Ok(None),
        _ => number_from(&v, expected::<T>())
            .map(Some)
            .map_err(D::Error::custom),
    }
}

/// A list of strings, or one comma-separated string (`"qkv_proj,o_proj"`).
pub fn list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let v = Value::deserialize(d)?;
    match &v {
        Value::String(s) => Ok(s
            .split(',')
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect()),
        Value::Sequence(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Ok(s.clone()),
                other => Err(D::Error::custom(format!(
                    "expected a list of names, got {} in it",
                    kind(other)
                ))),
            })
            .collect(),
        other => Err(D::Error::custom(format!(
            "expected a list of names, got {}",
            kind(other)
        ))),
    }
}
