//! Validated command inputs. Each type can only hold a valid value; parsing collects field errors so a client
//! learns about every invalid field at once.

use cqrs_common::FieldError;
use serde_json::Value;

/// Largest accepted price: 100 million (in cents: 10^10). Anything above is a typo or an attack.
pub const MAX_PRICE_CENTS: i64 = 10_000_000_000;
pub const MAX_NAME_CHARS: usize = 200;
pub const MAX_DESCRIPTION_CHARS: usize = 5_000;
pub const MIN_PASSWORD_CHARS: usize = 8;
pub const MAX_PASSWORD_CHARS: usize = 1_024;
pub const MAX_QUANTITY: u32 = 1_000_000;

/// An email address, trimmed; compared case-insensitively by the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        if s.len() > 254 {
            return Err("must be at most 254 characters".into());
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("must not contain whitespace".into());
        }
        let Some((local, domain)) = s.split_once('@') else {
            return Err("must be an email address (name@domain)".into());
        };
        if local.is_empty() || domain.is_empty() || domain.contains('@') || !domain.contains('.') {
            return Err("must be an email address (name@domain)".into());
        }
        if domain.starts_with('.') || domain.ends_with('.') || domain.contains("..") {
            return Err("has an invalid domain".into());
        }
        Ok(Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A plain-text password on its way to the hasher. Its `Debug` never shows the value.
pub struct Password(String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

impl Password {
    pub fn parse(s: &str) -> Result<Self, String> {
        let n = s.chars().count();
        if n < MIN_PASSWORD_CHARS {
            return Err(format!("must be at least {MIN_PASSWORD_CHARS} characters"));
        }
        if n > MAX_PASSWORD_CHARS {
            return Err(format!("must be at most {MAX_PASSWORD_CHARS} characters"));
        }
        Ok(Self(s.to_owned()))
    }
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// Money in cents, parsed from the decimal text the client sent (a JSON number or a string), never via f64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PriceCents(pub i64);

impl PriceCents {
    /// `"19.99"` → 1999. At most two decimals, not negative, at most [`MAX_PRICE_CENTS`]; no exponents.
    pub fn parse_decimal(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if t.is_empty() {
            return Err("must be a decimal amount such as 19.99".into());
        }
        if t.starts_with('-') {
            return Err("must not be negative".into());
        }
        let (int, frac) = match t.split_once('.') {
            Some((i, f)) => (i, f),
            None => (t, ""),
        };
        let digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
        if int.is_empty() || !digits(int) || !digits(frac) || (t.contains('.') && frac.is_empty()) {
            return Err(
                "must be a decimal amount such as 19.99 (digits, optional point, no exponent)"
                    .into(),
            );
        }
        if frac.len() > 2 {
            return Err("must have at most 2 decimal places".into());
        }
        let int = int.trim_start_matches('0');
        // 11 integer digits already exceed the maximum; checking the length first avoids overflow.
        if int.len() > 11 {
            return Err("is too large".into());
        }
        let whole: i64 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| "is too large".to_owned())?
        };
        let mut cents: i64 = 0;
        for (i, c) in frac.chars().enumerate() {
            let d = i64::from(c as u8 - b'0');
            cents += if i == 0 { d * 10 } else { d };
        }
        let total = whole
            .checked_mul(100)
            .and_then(|w| w.checked_add(cents))
            .ok_or("is too large")?;
        if total > MAX_PRICE_CENTS {
            return Err(format!("must be at most {}", format_cents(MAX_PRICE_CENTS)));
        }
        Ok(Self(total))
    }

    /// From the raw JSON text of the `price` field: a number (`19.99`) or a string (`"19.99"`).
    pub fn parse_json(raw: &str) -> Result<Self, String> {
        let raw = raw.trim();
        if raw.starts_with('"') {
            let s: String =
                serde_json::from_str(raw).map_err(|_| "must be a decimal amount".to_owned())?;
            Self::parse_decimal(&s)
        } else if raw.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
            if raw.contains(['e', 'E']) {
                return Err("must be written without an exponent, e.g. 19.99".into());
            }
            Self::parse_decimal(raw)
        } else {
            Err("must be a number or a decimal string, e.g. 19.99".into())
        }
    }
}

/// 1999 → `"19.99"`.
pub fn format_cents(c: i64) -> String {
    let sign = if c < 0 { "-" } else { "" };
    let a = c.unsigned_abs();
    format!("{sign}{}.{:02}", a / 100, a % 100)
}

/// Collects field errors while reading a JSON object.
#[derive(Default)]
pub struct Fields {
    pub errors: Vec<FieldError>,
}

impl Fields {
    pub fn err(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    /// A required non-empty string (trimmed, at most `max` chars).
    pub fn string(
        &mut self,
        obj: &serde_json::Map<String, Value>,
        key: &str,
        max: usize,
    ) -> Option<String> {
        match obj.get(key) {
            None | Some(Value::Null) => {
                self.err(key, "is required");
                None
            }
            Some(v) => self.string_value(key, v, max),
        }
    }

    pub fn string_value(&mut self, key: &str, v: &Value, max: usize) -> Option<String> {
        match v {
            Value::String(s) => {
                let t = s.trim();
                if t.is_empty() {
                    self.err(key, "must not be empty");
                    None
                } else if t.chars().count() > max {
                    self.err(key, format!("must be at most {max} characters"));
                    None
                } else if t.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
                    self.err(key, "must not contain control characters");
                    None
                } else {
                    Some(t.to_owned())
                }
            }
            _ => {
                self.err(key, "must be a string");
                None
            }
        }
    }

    /// An optional string: absent → `None`, `null` → `Some(None)` (clear it), a string → `Some(Some(s))`.
    pub fn optional_string(
        &mut self,
        obj: &serde_json::Map<String, Value>,
        key: &str,
        max: usize,
    ) -> Option<Option<String>> {
        match obj.get(key) {
            None => None,
            Some(Value::Null) => Some(None),
            Some(v) => self.string_value(key, v, max).map(Some),
        }
    }

    pub fn into_result(self) -> Result<(), Vec<FieldError>> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(self.errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_convert_exactly() {
        for (text, cents) in [
            ("19.99", 1999),
            ("\"19.99\"", 1999),
            ("0.1", 10),
            ("0.29", 29),
            ("1", 100),
            ("\"007.50\"", 750),
            ("0", 0),
            ("100000000", MAX_PRICE_CENTS),
            ("1.10", 110),
        ] {
            assert_eq!(
                PriceCents::parse_json(text),
                Ok(PriceCents(cents)),
                "{text}"
            );
        }
    }

    #[test]
    fn bad_prices_are_rejected() {
        for text in [
            "19.999",
            "-1",
            "\"-0.01\"",
            "1e3",
            "1.",
            ".5",
            "\"\"",
            "\"abc\"",
            "true",
            "null",
            "[]",
            "100000000.01",
            "99999999999999999999999",
            "\"1,00\"",
            "\" \"",
            "0x10",
        ] {
            assert!(
                PriceCents::parse_json(text).is_err(),
                "{text} should be rejected"
            );
        }
    }

    #[test]
    fn cents_format() {
        assert_eq!(format_cents(1999), "19.99");
        assert_eq!(format_cents(5), "0.05");
        assert_eq!(format_cents(100), "1.00");
    }

    #[test]
    fn emails() {
        assert!(Email::parse("a@b.io").is_ok());
        assert_eq!(
            Email::parse("  A@B.io ").map(|e| e.as_str().to_owned()),
            Ok("A@B.io".to_owned())
        );
        for bad in [
            "", "ab", "a@", "@b.io", "a@b", "a b@c.io", "a@b@c.io", "a@.io", "a@b..io",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn password_debug_is_redacted() {
        let p = Password::parse("hunter2hunter2").map_err(|e| e.to_string());
        assert!(!format!("{p:?}").contains("hunter2"));
    }
}
