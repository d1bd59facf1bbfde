//! The one way a URL reaches a message: without its credentials and its
//! query string. Connection URLs carry passwords (`smtps://user:pass@relay`,
//! `postgres://…`), and webhook, provider and presigned URLs carry tokens in
//! their query strings; a message is read by people who must not see either
//! (a job's `error_message`, its logs and result are visible to every member
//! of the workspace; operators' logs go to shared log stores). So every
//! message that may hold a URL goes through [`text`] before it is stored,
//! and code that names a URL it knows uses [`url`].

use std::borrow::Cow;

/// What replaces the credentials of a URL.
const HIDDEN: &str = "***";

/// `u` without its password (a user name becomes `***` too: some services
/// take the secret as the user name) and without its query string and
/// fragment. A value that is not a URL is scrubbed as text.
pub fn url(u: &str) -> String {
    match url::Url::parse(u) {
        Ok(parsed) => clean(parsed),
        Err(_) => text(u).into_owned(),
    }
}

fn clean(mut parsed: url::Url) -> String {
    if !parsed.username().is_empty() || parsed.password().is_some() {
        // Both fail only for URLs that cannot have credentials, which then
        // have none to hide.
        let _ = parsed.set_password(None);
        let _ = parsed.set_username(HIDDEN);
    }
    parsed.set_query(None);
    parsed.set_fragment(None);
    parsed.to_string()
}

/// `s` with every URL in it (`scheme://…`) passed through [`url`];
/// borrowed when it holds none, which is nearly always. A URL ends where
/// prose puts something after one (a space, a quote, a parenthesis, a
/// comma…), except in its credentials, which may hold any of those: they
/// run to the last `@` of the authority, and are hidden whole.
pub fn text(s: &str) -> Cow<'_, str> {
    if !s.contains("://") {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find("://") {
        // The scheme: letters, digits, `+`, `-` and `.` before `://`.
        let scheme_start = rest[..at]
            .char_indices()
            .rev()
            .take_while(|(_, c)| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
            .last()
            .map_or(at, |(i, _)| i);
        let body = &rest[at + 3..];
        let authority_end = body
            .find(|c: char| c.is_whitespace() || c.is_control() || "/?#\"'<>`".contains(c))
            .unwrap_or(body.len());
        let userinfo = body[..authority_end].rfind('@');
        let host_start = userinfo.map_or(0, |i| i + 1);
        let end = body[host_start..]
            .find(|c: char| c.is_whitespace() || c.is_control() || "\"'<>(){}`,;|\\".contains(c))
            .map_or(body.len(), |i| host_start + i);
        out.push_str(&rest[..scheme_start]);
        let whole = &rest[scheme_start..at + 3 + end];
        match userinfo {
            Some(_) => {
                out.push_str(&rest[scheme_start..at + 3]);
                out.push_str(HIDDEN);
                out.push('@');
                out.push_str(without_query(&body[host_start..end]));
            }
            None => match url::Url::parse(whole) {
                Ok(parsed) if scheme_start < at => out.push_str(&clean(parsed)),
                // Not a URL the parser takes: whatever precedes an `@`
                // could be credentials (a password with a `/` in it).
                _ => match without_query(whole).rfind('@') {
                    Some(i) => {
                        out.push_str(&rest[scheme_start..at + 3]);
                        out.push_str(HIDDEN);
                        out.push_str(without_query(&whole[i..]));
                    }
                    None => out.push_str(without_query(whole)),
                },
            },
        }
        rest = &rest[at + 3 + end..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// `s` up to its query string or fragment.
fn without_query(s: &str) -> &str {
    &s[..s.find(['?', '#']).unwrap_or(s.len())]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_and_query_strings_never_survive() {
        assert_eq!(
            url("smtps://mailer:s3cret@relay.example.com:465"),
            "smtps://***@relay.example.com:465"
        );
        assert_eq!(
            url("https://hooks.example.com/in?token=abc#frag"),
            "https://hooks.example.com/in"
        );
        assert_eq!(
            url("postgres://app:pw@db.internal:5432/offload?sslmode=require"),
            "postgres://***@db.internal:5432/offload"
        );
        assert_eq!(
            url("https://api.example.com/v1"),
            "https://api.example.com/v1"
        );
        assert_eq!(url("ses"), "ses");
    }

    #[test]
    fn every_url_in_a_message_is_cleaned_and_the_rest_kept() {
        let msg = "smtp://u:p4ss@127.0.0.1:1 (from smtps://a:b@c:465): connection refused; \
                   see \"https://x.example/cb?sig=zzz\" and http://[::1]:80/?k=v.";
        let out = text(msg);
        for secret in ["p4ss", "sig=zzz", "k=v", ":b@"] {
            assert!(!out.contains(secret), "{secret} in {out}");
        }
        assert!(out.contains("connection refused; see"), "{out}");
        assert!(out.contains("smtp://***@127.0.0.1:1"), "{out}");
        assert!(out.contains("https://x.example/cb\""), "{out}");
        assert!(matches!(text("no urls here"), Cow::Borrowed(_)));
    }

    #[test]
    fn urls_the_parser_refuses_still_lose_their_secrets() {
        // A port out of range makes the URL unparseable.
        let out = text("cannot reach smtp://user:hunter2@host:99999/x?token=t1 now");
        assert!(!out.contains("hunter2") && !out.contains("t1"), "{out}");
        assert!(out.contains("smtp://***@host:99999/x now"), "{out}");
        let out = text("bad: ://user:pw@host");
        assert!(!out.contains("pw"), "{out}");
    }

    #[test]
    fn credentials_with_punctuation_or_an_at_sign_are_hidden_whole() {
        for (msg, kept) in [
            (
                "smtp://u:pa,ss@relay:25/x?y=1 refused",
                "smtp://***@relay:25/x refused",
            ),
            ("(smtp://u:p@ss@relay:99999)", "(smtp://***@relay:99999)"),
            (
                "postgres://u:pa(s)s;w@db/app, then",
                "postgres://***@db/app, then",
            ),
            ("smtp://u:pa/ss@relay:25 down", "smtp://***@relay:25 down"),
            (
                "see https://medium.com/@ann/post?x=1.",
                "see https://medium.com/@ann/post",
            ),
        ] {
            assert_eq!(text(msg), kept, "{msg}");
        }
    }
}
