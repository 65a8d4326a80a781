//! Store and target URLs as arguments, checked without being echoed.
//!
//! clap's own error for a value that does not parse repeats the value, and
//! with it any password: these parsers report what is wrong with the URL
//! through the type's own error, which shows it redacted.

use std::ffi::OsStr;
use std::fmt::Display;
use std::marker::PhantomData;
use std::str::FromStr;

use clap::builder::TypedValueParser;
use clap::error::ErrorKind;

/// Parses `T` from a URL argument; a refusal never shows the value as given.
#[derive(Debug)]
pub struct UrlParser<T>(PhantomData<fn() -> T>);

impl<T> UrlParser<T> {
    pub fn new() -> Self {
        Self(PhantomData)
    }
}

impl<T> Clone for UrlParser<T> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<T> TypedValueParser for UrlParser<T>
where
    T: FromStr + Clone + Send + Sync + 'static,
    T::Err: Display,
{
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<T, clap::Error> {
        let name = arg
            .and_then(|a| a.get_long())
            .map_or_else(|| "URL".to_owned(), |long| format!("--{long}"));
        let refuse = |kind, message: String| clap::Error::raw(kind, message).with_cmd(cmd);
        let value = value.to_str().ok_or_else(|| {
            refuse(
                ErrorKind::InvalidUtf8,
                format!("{name} is not valid UTF-8\n"),
            )
        })?;
        value.parse().map_err(|e: T::Err| {
            refuse(ErrorKind::ValueValidation, format!("invalid {name}: {e}\n"))
        })
    }
}
