//! `NAME`, `NAME:VERSION`, `NAME:latest` or `NAME@ALIAS`: how commands name a model version.

use crate::error::{RegistryError, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Latest,
    Version(u64),
    Alias(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionSpec {
    pub name: String,
    pub selector: Selector,
}

impl VersionSpec {
    pub fn parse(text: &str) -> Result<VersionSpec> {
        let bad = |why: &str| {
            RegistryError::Usage(format!(
                "{text:?}: {why}; expected NAME, NAME:VERSION, NAME:latest or NAME@ALIAS"
            ))
        };
        let (name, selector) = if let Some((n, alias)) = text.split_once('@') {
            if alias.is_empty() {
                return Err(bad("empty alias"));
            }
            (n, Selector::Alias(alias.to_string()))
        } else if let Some((n, v)) = text.rsplit_once(':') {
            match v {
                "latest" => (n, Selector::Latest),
                _ => (
                    n,
                    Selector::Version(v.parse().map_err(|_| bad("the version is not a number"))?),
                ),
            }
        } else {
            (text, Selector::Latest)
        };
        validate_name(name)?;
        Ok(VersionSpec {
            name: name.to_string(),
            selector,
        })
    }
}

/// Names as MLflow and Azure ML accept them: letters, digits, `-`, `_`, `.`; at most 255.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(RegistryError::Usage(format!(
            "model name {name:?}: use letters, digits, '-', '_' and '.', starting with a letter or digit"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_say_what_is_expected() {
        let p = |t| VersionSpec::parse(t).unwrap();
        assert_eq!(p("phi3-chat").selector, Selector::Latest);
        assert_eq!(p("phi3-chat:latest").selector, Selector::Latest);
        assert_eq!(
            p("phi3-chat:1764130000").selector,
            Selector::Version(1764130000)
        );
        assert_eq!(p("phi3-chat@prod").selector, Selector::Alias("prod".into()));
        assert_eq!(p("phi3-chat@prod").name, "phi3-chat");
        for bad in ["x:one", "", "-x", "a b", "x@"] {
            let e = VersionSpec::parse(bad).unwrap_err();
            assert!(e.is_usage(), "{bad}: {e}");
        }
    }
}
