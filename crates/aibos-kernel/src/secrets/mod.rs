//! Secrets at rest: values the kernel must read back in clear (token-signing
//! seeds, canon assertion secrets) are stored sealed under a master key with
//! XChaCha20-Poly1305, never in clear.
//!
//! A sealed value is text: `enc:v1:<key id>:<base64url(nonce ‖ ciphertext ‖ tag)>`.
//! - `v1` names the format, so a later one can be told apart.
//! - The key id (16 hex digits of a SHA-256 of the key, which reveals nothing of
//!   it) says which master key sealed the value: a rotation re-seals what the old
//!   key sealed, and a wrong key is refused with both ids named instead of a bare
//!   "does not decrypt".
//! - The nonce is 24 random bytes per seal: XChaCha20's nonce is long enough
//!   that random ones never repeat in practice, so no counter has to be kept
//!   across instances.
//! - The associated data names the value's place (`signing_keys.private_key:<kid>`),
//!   so a ciphertext copied into another row does not open.
//!
//! Where the key comes from, and its first-start generation: [`source`]. The
//! SQL that seals clear values on upgrade and re-seals on rotation: [`store`].

pub mod source;
pub mod store;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};

/// The prefix of every sealed value of format 1.
pub const SEALED_PREFIX: &str = "enc:v1:";
/// Bytes of a master key.
pub const MASTER_KEY_BYTES: usize = 32;
/// Bytes of an XChaCha20 nonce.
const NONCE_BYTES: usize = 24;
/// Bytes of a Poly1305 tag.
const TAG_BYTES: usize = 16;

/// One 256-bit master key. Its bytes live only inside the cipher (which wipes
/// them when dropped); `Debug` shows the key id, never the key.
pub struct MasterKey {
    id: String,
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl MasterKey {
    /// A key from its 32 bytes.
    pub fn from_bytes(mut bytes: [u8; MASTER_KEY_BYTES]) -> MasterKey {
        let mut hasher = Sha256::new();
        hasher.update(b"aibos master key id\0");
        hasher.update(bytes);
        let digest = hasher.finalize();
        let id = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        let cipher = XChaCha20Poly1305::new(&Key::from(bytes));
        // Best effort: the copy handed to the cipher is wiped by it on drop.
        bytes.fill(0);
        MasterKey { id, cipher }
    }

    /// Parses a key written as base64 (standard or URL-safe, padded or not) or
    /// as 64 hex digits; surrounding whitespace is ignored. The error never
    /// repeats the text.
    pub fn parse(text: &str) -> Result<MasterKey, String> {
        let text = text.trim();
        let bytes =
            if text.len() == MASTER_KEY_BYTES * 2 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
                (0..MASTER_KEY_BYTES)
                    .map(|i| u8::from_str_radix(&text[i * 2..i * 2 + 2], 16).ok())
                    .collect::<Option<Vec<u8>>>()
            } else {
                [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
                    .iter()
                    .find_map(|engine| engine.decode(text).ok())
            };
        let mut bytes = bytes.ok_or_else(|| {
            format!("must be {MASTER_KEY_BYTES} bytes written as base64 or as 64 hex digits")
        })?;
        let key: Result<[u8; MASTER_KEY_BYTES], _> = bytes.as_slice().try_into();
        bytes.fill(0);
        key.map(MasterKey::from_bytes).map_err(|_| {
            format!(
                "must be exactly {MASTER_KEY_BYTES} bytes (a 256-bit key); this one has {}",
                bytes.len()
            )
        })
    }

    /// A new random key and its text form (standard base64, as key files hold it).
    pub fn generate() -> (MasterKey, String) {
        let mut bytes = [0u8; MASTER_KEY_BYTES];
        getrandom::fill(&mut bytes).expect("the operating system's random source works");
        let text = STANDARD.encode(bytes);
        (MasterKey::from_bytes(bytes), text)
    }

    /// The key's id, as sealed values name it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Seals `plaintext` for the place `associated_data` names.
    pub fn seal(&self, plaintext: &str, associated_data: &str) -> String {
        let mut nonce = [0u8; NONCE_BYTES];
        getrandom::fill(&mut nonce).expect("the operating system's random source works");
        let aad = bound_data(associated_data);
        let ciphertext = self
            .cipher
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: aad.as_bytes(),
                },
            )
            .expect("XChaCha20-Poly1305 seals any value shorter than 256 GiB");
        let mut body = Vec::with_capacity(NONCE_BYTES + ciphertext.len());
        body.extend_from_slice(&nonce);
        body.extend_from_slice(&ciphertext);
        format!(
            "{SEALED_PREFIX}{}:{}",
            self.id,
            URL_SAFE_NO_PAD.encode(body)
        )
    }

    fn open(&self, body: &[u8], associated_data: &str) -> Option<String> {
        let (nonce, ciphertext) = body.split_at(NONCE_BYTES);
        let nonce: [u8; NONCE_BYTES] = nonce.try_into().ok()?;
        let aad = bound_data(associated_data);
        let plain = self
            .cipher
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad: aad.as_bytes(),
                },
            )
            .ok()?;
        String::from_utf8(plain).ok()
    }
}

/// The format version is part of what is authenticated, so a value cannot be
/// passed off as another format's.
fn bound_data(associated_data: &str) -> String {
    format!("aibos/{SEALED_PREFIX}{associated_data}")
}

/// Why a stored value did not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// It starts like a sealed value but is not one.
    #[error("it is not a well-formed sealed value")]
    Malformed,
    /// Sealed under a key this kernel does not hold.
    #[error(
        "it was sealed under master key {sealed_by}, which is not the configured one ({configured})"
    )]
    UnknownKey {
        /// The id the value names.
        sealed_by: String,
        /// The ids of the keys this kernel holds.
        configured: String,
    },
    /// The key is right but the value does not authenticate: changed, or moved from another row.
    #[error(
        "it does not authenticate under master key {0}: the value was altered or copied from another row"
    )]
    Tampered(String),
}

/// The master keys in force: the current one seals and opens; a previous one
/// (during a rotation) only opens.
#[derive(Debug)]
pub struct MasterKeys {
    current: MasterKey,
    previous: Option<MasterKey>,
    /// Where the current key came from, for error messages (never the key).
    source: String,
}

impl MasterKeys {
    /// Keys from their parts; `source` says where the current one came from.
    pub fn new(
        current: MasterKey,
        previous: Option<MasterKey>,
        source: impl Into<String>,
    ) -> MasterKeys {
        MasterKeys {
            current,
            previous,
            source: source.into(),
        }
    }

    /// One key, for tests and tools: seals and opens.
    pub fn single(current: MasterKey) -> MasterKeys {
        MasterKeys::new(current, None, "a key given directly")
    }

    /// The key that seals.
    pub fn current(&self) -> &MasterKey {
        &self.current
    }

    /// Where the current key came from (`auth.master_key`, or a file's path).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Seals with the current key.
    pub fn seal(&self, plaintext: &str, associated_data: &str) -> String {
        self.current.seal(plaintext, associated_data)
    }

    /// Opens a sealed value with whichever key sealed it.
    pub fn open(&self, sealed: &str, associated_data: &str) -> Result<String, OpenError> {
        let (key_id, body) = split(sealed).ok_or(OpenError::Malformed)?;
        let key = [Some(&self.current), self.previous.as_ref()]
            .into_iter()
            .flatten()
            .find(|k| k.id == key_id)
            .ok_or_else(|| OpenError::UnknownKey {
                sealed_by: key_id.to_owned(),
                configured: self.describe_ids(),
            })?;
        let body = URL_SAFE_NO_PAD
            .decode(body)
            .ok()
            .filter(|b| b.len() >= NONCE_BYTES + TAG_BYTES)
            .ok_or(OpenError::Malformed)?;
        key.open(&body, associated_data)
            .ok_or_else(|| OpenError::Tampered(key_id.to_owned()))
    }

    /// Whether values sealed by the key `id` open with these keys.
    pub fn knows(&self, id: &str) -> bool {
        self.current.id == id || self.previous.as_ref().is_some_and(|p| p.id == id)
    }

    /// Whether the value was sealed by the current key (a rotation leaves those alone).
    pub fn sealed_by_current(&self, stored: &str) -> bool {
        sealed_by(stored) == Some(self.current.id())
    }

    fn describe_ids(&self) -> String {
        match &self.previous {
            Some(p) => format!(
                "{} from {}, previous {}",
                self.current.id, self.source, p.id
            ),
            None => format!("{} from {}", self.current.id, self.source),
        }
    }
}

/// Whether a stored value is sealed (any key, this format).
pub fn is_sealed(stored: &str) -> bool {
    stored.starts_with(SEALED_PREFIX)
}

/// The id of the key that sealed `stored`, if it is sealed.
pub fn sealed_by(stored: &str) -> Option<&str> {
    split(stored).map(|(id, _)| id)
}

fn split(stored: &str) -> Option<(&str, &str)> {
    stored.strip_prefix(SEALED_PREFIX)?.split_once(':')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_sealed_value_opens_in_its_own_place_only() {
        let keys = MasterKeys::single(MasterKey::generate().0);
        let sealed = keys.seal("kas_1_secret", "canon_assertion_secrets.secret:c1:k1");
        assert!(is_sealed(&sealed));
        assert!(!sealed.contains("kas_1_secret"));
        assert_eq!(sealed_by(&sealed), Some(keys.current().id()));
        assert_eq!(
            keys.open(&sealed, "canon_assertion_secrets.secret:c1:k1")
                .unwrap(),
            "kas_1_secret"
        );
        // Copied to another row: refused.
        assert_eq!(
            keys.open(&sealed, "canon_assertion_secrets.secret:c2:k1"),
            Err(OpenError::Tampered(keys.current().id().to_owned()))
        );
    }

    #[test]
    fn every_seal_uses_a_new_nonce() {
        let keys = MasterKeys::single(MasterKey::generate().0);
        assert_ne!(keys.seal("same", "p"), keys.seal("same", "p"));
    }

    #[test]
    fn another_key_is_named_not_guessed() {
        let a = MasterKeys::new(MasterKey::generate().0, None, "auth.master_key");
        let b = MasterKeys::single(MasterKey::generate().0);
        let sealed = b.seal("x", "p");
        let err = a.open(&sealed, "p").unwrap_err();
        let OpenError::UnknownKey {
            sealed_by,
            configured,
        } = &err
        else {
            panic!("{err:?}")
        };
        assert_eq!(sealed_by, b.current().id());
        assert!(configured.contains("auth.master_key"));
        assert!(configured.contains(a.current().id()));
    }

    #[test]
    fn a_previous_key_opens_but_never_seals() {
        let (old, old_text) = MasterKey::generate();
        let old_id = old.id().to_owned();
        let sealed_old = MasterKeys::single(old).seal("seed", "p");
        let keys = MasterKeys::new(
            MasterKey::generate().0,
            Some(MasterKey::parse(&old_text).unwrap()),
            "test",
        );
        assert_eq!(keys.open(&sealed_old, "p").unwrap(), "seed");
        assert!(!keys.sealed_by_current(&sealed_old));
        let resealed = keys.seal("seed", "p");
        assert!(keys.sealed_by_current(&resealed));
        assert_ne!(sealed_by(&resealed), Some(old_id.as_str()));
    }

    #[test]
    fn altered_or_truncated_values_are_refused() {
        let keys = MasterKeys::single(MasterKey::generate().0);
        let sealed = keys.seal("value", "p");
        let mut altered = sealed.clone().into_bytes();
        let last = altered.len() - 1;
        altered[last] = if altered[last] == b'A' { b'B' } else { b'A' };
        let altered = String::from_utf8(altered).unwrap();
        assert!(keys.open(&altered, "p").is_err());
        assert_eq!(
            keys.open(&sealed[..sealed.len() - 30], "p"),
            Err(OpenError::Malformed)
        );
        assert_eq!(keys.open("enc:v1:nocolon", "p"), Err(OpenError::Malformed));
        assert_eq!(keys.open("plain", "p"), Err(OpenError::Malformed));
    }

    #[test]
    fn keys_parse_from_base64_or_hex_and_ids_are_stable() {
        let bytes = [7u8; 32];
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let from_hex = MasterKey::parse(&hex).unwrap();
        let from_b64 = MasterKey::parse(&format!("  {}\n", STANDARD.encode(bytes))).unwrap();
        let from_url = MasterKey::parse(&URL_SAFE_NO_PAD.encode(bytes)).unwrap();
        assert_eq!(from_hex.id(), from_b64.id());
        assert_eq!(from_hex.id(), from_url.id());
        assert_eq!(from_hex.id().len(), 16);
        let err = MasterKey::parse(&STANDARD.encode([1u8; 16])).unwrap_err();
        assert!(err.contains("16"), "{err}");
        assert!(MasterKey::parse("not a key!").is_err());
        let err = MasterKey::parse("c2VjcmV0").unwrap_err();
        assert!(!err.contains("c2VjcmV0"));
        // Debug never shows the key.
        assert!(!format!("{from_hex:?}").contains(&hex));
    }

    proptest! {
        #[test]
        fn seal_then_open_is_the_identity(text in ".{0,200}", place in "[a-z_.:0-9-]{1,40}") {
            let keys = MasterKeys::single(MasterKey::from_bytes([3u8; 32]));
            let sealed = keys.seal(&text, &place);
            prop_assert!(is_sealed(&sealed));
            prop_assert_eq!(keys.open(&sealed, &place).unwrap(), text);
        }
    }
}
