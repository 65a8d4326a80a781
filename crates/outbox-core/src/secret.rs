//! Credentials in URLs never print: every message that names a store or a
//! broker by its URL shows it through [`redact_url`], and programs that
//! print what drivers say mask the passwords they were given with
//! [`Secrets`].

/// `url` with the password of its user part shown as `***`: what any
/// message may show of a URL. Malformed URLs are redacted too: everything
/// between the user name and the last `@` before the query is hidden, so a
/// password with an unescaped `/`, `?` or `@` stays hidden as well.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let userinfo_end = match rest.rfind('@') {
        Some(at) => at,
        None => return url.to_owned(),
    };
    let userinfo = &rest[..userinfo_end];
    let shown = match userinfo.split_once(':') {
        Some((user, _password)) => format!("{user}:***"),
        // A user name alone: no secret, unless it is a token.
        None if userinfo.len() > 64 => "***".to_owned(),
        None => userinfo.to_owned(),
    };
    let tail = &rest[userinfo_end..];
    match scheme {
        Some(scheme) => format!("{scheme}://{shown}{tail}"),
        None => format!("{shown}{tail}"),
    }
}

/// The password of a URL's user part, as given and percent-decoded (what a
/// driver may repeat), if it has one.
pub fn url_password(url: &str) -> Vec<String> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let Some(at) = rest.rfind('@') else {
        return Vec::new();
    };
    let Some((_, password)) = rest[..at].split_once(':') else {
        return Vec::new();
    };
    if password.is_empty() {
        return Vec::new();
    }
    let mut forms = vec![password.to_owned()];
    let decoded = percent_decode(password);
    if decoded != password {
        forms.push(decoded);
    }
    forms
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Passwords a program was given, to mask in anything it prints that came
/// from elsewhere (a driver's error, a log line). Redacting at the source
/// ([`redact_url`]) is the rule; this is the net beneath it.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    words: Vec<String>,
}

impl Secrets {
    /// No secrets yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the password of `url`, if it has one (as given and decoded).
    pub fn add_url(&mut self, url: &str) {
        for word in url_password(url) {
            self.add(word);
        }
    }

    /// Adds a secret. Longer ones are masked first, so that one secret
    /// inside another leaves nothing of the longer one.
    pub fn add(&mut self, word: impl Into<String>) {
        let word = word.into();
        if word.is_empty() || self.words.contains(&word) {
            return;
        }
        self.words.push(word);
        self.words.sort_by_key(|w| std::cmp::Reverse(w.len()));
    }

    /// Whether there is nothing to mask.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// `text` with every secret replaced by `***`.
    pub fn mask(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for word in &self.words {
            if text.contains(word.as_str()) {
                text = text.replace(word.as_str(), "***");
            }
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden_in_well_formed_and_malformed_urls() {
        for (url, shown) in [
            (
                "postgres://app:pw@db:5432/shop",
                "postgres://app:***@db:5432/shop",
            ),
            (
                "postgres://u:pw@[::1:5432/db",
                "postgres://u:***@[::1:5432/db",
            ),
            ("nats://n:p/a?s@h:4222", "nats://n:***@h:4222"),
            ("amqp://g:p@ss@h:5672/%2f", "amqp://g:***@h:5672/%2f"),
            ("u:pw@host/db", "u:***@host/db"),
            ("postgres://app@db/shop", "postgres://app@db/shop"),
            ("sqlite://orders.db", "sqlite://orders.db"),
            ("", ""),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn secrets_are_masked_as_given_and_decoded() {
        let mut secrets = Secrets::new();
        secrets.add_url("postgres://app:p%40ss%2Fw@db/shop");
        secrets.add_url("sqlite://x.db");
        let text = "cannot connect: password p@ss/w or p%40ss%2Fw refused";
        assert_eq!(
            secrets.mask(text),
            "cannot connect: password *** or *** refused"
        );
        let mut none = Secrets::new();
        none.add_url("sqlite://x.db");
        none.add_url("postgres://app@db/shop");
        assert!(none.is_empty());
    }
}
