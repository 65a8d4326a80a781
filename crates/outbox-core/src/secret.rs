//! Credentials in URLs never print: every message that names a store or a
//! broker by its URL shows it through [`redact_url`], and programs that
//! print what drivers say mask the passwords they were given with
//! [`Secrets`].

/// `url` split around its user part: what comes before it (the scheme and
/// `://`, if any), the user part, and the rest from the last `@` on. The
/// last `@`: a password with an unescaped `/`, `?` or `@` stays inside.
fn split_userinfo(url: &str) -> Option<(&str, &str, &str)> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let at = start + url[start..].rfind('@')?;
    Some((&url[..start], &url[start..at], &url[at..]))
}

/// `url` with the password of its user part shown as `***`: what any
/// message may show of a URL. Malformed URLs are redacted too: everything
/// between the user name and the last `@` is hidden.
pub fn redact_url(url: &str) -> String {
    let Some((head, userinfo, tail)) = split_userinfo(url) else {
        return url.to_owned();
    };
    let shown = match userinfo.split_once(':') {
        Some((user, _password)) => format!("{user}:***"),
        // A user name alone: no secret, unless it is a token.
        None if userinfo.len() > 64 => "***".to_owned(),
        None => userinfo.to_owned(),
    };
    format!("{head}{shown}{tail}")
}

/// The password of a URL's user part, as given and percent-decoded (what a
/// driver may repeat), if it has one.
pub fn url_password(url: &str) -> Vec<String> {
    let password = split_userinfo(url).and_then(|(_, userinfo, _)| userinfo.split_once(':'));
    match password {
        Some((_, password)) if !password.is_empty() => {
            let decoded = percent_decode(password);
            let mut forms = vec![password.to_owned()];
            if decoded != password {
                forms.push(decoded);
            }
            forms
        }
        _ => Vec::new(),
    }
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
