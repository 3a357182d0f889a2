//! The primitives snow runs the handshake and the transport with.
//!
//! snow's default resolver brings its own copies of X25519 and ChaCha20-Poly1305 (older
//! major versions of the same RustCrypto crates). This resolver gives it the project's
//! `x25519-dalek` and `chacha20poly1305` instead and leaves only BLAKE2s and the random
//! generator to snow's default. The Noise spec fixes what each primitive computes, so
//! this changes nothing on the wire: the tests complete handshakes against a peer that
//! uses snow's default resolver.

use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::ChaCha20Poly1305;
use snow::params::{CipherChoice, DHChoice, HashChoice, NoiseParams};
use snow::resolvers::{CryptoResolver, DefaultResolver, FallbackResolver};
use snow::types::{Cipher, Dh, Hash, Random};
use x25519_dalek::{PublicKey, StaticSecret};

use super::{NetError, NOISE_PARAMS, NOISE_PROLOGUE};

const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;

/// A snow builder for [`NOISE_PARAMS`] with this node's static key and our primitives.
pub(crate) fn handshake(
    private_key: &[u8; 32],
    initiator: bool,
) -> Result<snow::HandshakeState, NetError> {
    let params: NoiseParams = NOISE_PARAMS
        .parse()
        .map_err(|e: snow::Error| NetError::Handshake(e.to_string()))?;
    let resolver = FallbackResolver::new(Box::new(ProjectCrypto), Box::new(DefaultResolver));
    let builder = snow::Builder::with_resolver(params, Box::new(resolver))
        .prologue(NOISE_PROLOGUE)
        .and_then(|b| b.local_private_key(private_key))
        .map_err(|e| NetError::Handshake(e.to_string()))?;
    let state = if initiator {
        builder.build_initiator()
    } else {
        builder.build_responder()
    };
    state.map_err(|e| NetError::Handshake(e.to_string()))
}

/// Resolves X25519 and ChaChaPoly; everything else falls back to snow's default.
struct ProjectCrypto;

impl CryptoResolver for ProjectCrypto {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        None
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        match choice {
            DHChoice::Curve25519 => Some(Box::new(X25519::new([0; KEY_LEN]))),
            _ => None,
        }
    }

    fn resolve_hash(&self, _choice: &HashChoice) -> Option<Box<dyn Hash>> {
        None
    }

    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        match choice {
            CipherChoice::ChaChaPoly => Some(Box::new(ChaChaPoly { key: [0; KEY_LEN] })),
            _ => None,
        }
    }
}

/// X25519 key agreement with `x25519-dalek`.
struct X25519 {
    secret: StaticSecret,
    public: [u8; KEY_LEN],
}

impl X25519 {
    fn new(private: [u8; KEY_LEN]) -> X25519 {
        let secret = StaticSecret::from(private);
        let public = PublicKey::from(&secret).to_bytes();
        X25519 { secret, public }
    }
}

impl Dh for X25519 {
    fn name(&self) -> &'static str {
        "25519"
    }

    fn pub_len(&self) -> usize {
        KEY_LEN
    }

    fn priv_len(&self) -> usize {
        KEY_LEN
    }

    fn set(&mut self, privkey: &[u8]) {
        let mut bytes = [0; KEY_LEN];
        let len = privkey.len().min(KEY_LEN);
        bytes[..len].copy_from_slice(&privkey[..len]);
        *self = X25519::new(bytes);
    }

    fn generate(&mut self, rng: &mut dyn Random) -> Result<(), snow::Error> {
        let mut bytes = [0; KEY_LEN];
        rng.try_fill_bytes(&mut bytes)?;
        *self = X25519::new(bytes);
        Ok(())
    }

    fn pubkey(&self) -> &[u8] {
        &self.public
    }

    fn privkey(&self) -> &[u8] {
        self.secret.as_bytes()
    }

    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        let their: [u8; KEY_LEN] = pubkey
            .get(..KEY_LEN)
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or(snow::Error::Dh)?;
        let shared = self.secret.diffie_hellman(&PublicKey::from(their));
        // A low-order point makes the result independent of our key; Noise allows
        // refusing it, and a peer sending one is attacking.
        if !shared.was_contributory() {
            return Err(snow::Error::Dh);
        }
        out.get_mut(..KEY_LEN)
            .ok_or(snow::Error::Dh)?
            .copy_from_slice(shared.as_bytes());
        Ok(())
    }
}

/// ChaCha20-Poly1305 with `chacha20poly1305`; the Noise nonce is 32 zero bits followed by
/// the little-endian counter.
struct ChaChaPoly {
    key: [u8; KEY_LEN],
}

impl ChaChaPoly {
    fn aead(&self) -> ChaCha20Poly1305 {
        ChaCha20Poly1305::new(&self.key.into())
    }

    fn nonce(counter: u64) -> chacha20poly1305::Nonce {
        let mut bytes = [0u8; 12];
        bytes[4..].copy_from_slice(&counter.to_le_bytes());
        bytes.into()
    }
}

impl Cipher for ChaChaPoly {
    fn name(&self) -> &'static str {
        "ChaChaPoly"
    }

    fn set(&mut self, key: &[u8; KEY_LEN]) {
        self.key = *key;
    }

    fn encrypt(&self, nonce: u64, authtext: &[u8], plaintext: &[u8], out: &mut [u8]) -> usize {
        let len = plaintext.len();
        // snow sizes `out` for the tag; returning 0 (an invalid message) beats panicking.
        let Some(sealed) = out.get_mut(..len + TAG_LEN) else {
            return 0;
        };
        let (body, tag_out) = sealed.split_at_mut(len);
        body.copy_from_slice(plaintext);
        match self
            .aead()
            .encrypt_inout_detached(&ChaChaPoly::nonce(nonce), authtext, body.into())
        {
            Ok(tag) => {
                tag_out.copy_from_slice(&tag);
                len + TAG_LEN
            }
            Err(_) => 0,
        }
    }

    fn decrypt(
        &self,
        nonce: u64,
        authtext: &[u8],
        ciphertext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, snow::Error> {
        let len = ciphertext
            .len()
            .checked_sub(TAG_LEN)
            .ok_or(snow::Error::Decrypt)?;
        let (body, tag) = ciphertext.split_at(len);
        let tag: [u8; TAG_LEN] = tag.try_into().map_err(|_| snow::Error::Decrypt)?;
        let plain = out.get_mut(..len).ok_or(snow::Error::Decrypt)?;
        plain.copy_from_slice(body);
        self.aead()
            .decrypt_inout_detached(
                &ChaChaPoly::nonce(nonce),
                authtext,
                plain.into(),
                &tag.into(),
            )
            .map(|()| len)
            .map_err(|_| snow::Error::Decrypt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our primitives against snow's defaults, byte for byte: same ciphertext, same DH.
    #[test]
    fn primitives_match_snow_defaults() {
        let ours = ProjectCrypto;
        let theirs = DefaultResolver;
        let key = [9u8; KEY_LEN];
        let mut cipher_ours = ours.resolve_cipher(&CipherChoice::ChaChaPoly).unwrap();
        let mut cipher_theirs = theirs.resolve_cipher(&CipherChoice::ChaChaPoly).unwrap();
        cipher_ours.set(&key);
        cipher_theirs.set(&key);
        let plain = b"the same bytes on the wire";
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        let len_a = cipher_ours.encrypt(7, b"ad", plain, &mut a);
        let len_b = cipher_theirs.encrypt(7, b"ad", plain, &mut b);
        assert_eq!(a[..len_a], b[..len_b]);
        let mut back = [0u8; 64];
        let n = cipher_ours
            .decrypt(7, b"ad", &b[..len_b], &mut back)
            .unwrap();
        assert_eq!(&back[..n], plain);
        a[0] ^= 1;
        assert!(cipher_ours
            .decrypt(7, b"ad", &a[..len_a], &mut back)
            .is_err());
        cipher_ours.rekey();
        cipher_theirs.rekey();
        let len_a = cipher_ours.encrypt(8, b"", plain, &mut a);
        let len_b = cipher_theirs.encrypt(8, b"", plain, &mut b);
        assert_eq!(a[..len_a], b[..len_b]);

        let mut dh_ours = ours.resolve_dh(&DHChoice::Curve25519).unwrap();
        let mut dh_theirs = theirs.resolve_dh(&DHChoice::Curve25519).unwrap();
        dh_ours.set(&[1u8; KEY_LEN]);
        dh_theirs.set(&[2u8; KEY_LEN]);
        let mut shared_a = [0u8; KEY_LEN];
        let mut shared_b = [0u8; KEY_LEN];
        dh_ours.dh(dh_theirs.pubkey(), &mut shared_a).unwrap();
        dh_theirs.dh(dh_ours.pubkey(), &mut shared_b).unwrap();
        assert_eq!(shared_a, shared_b);
        // The all-zero point is of low order: refused.
        assert!(dh_ours.dh(&[0u8; KEY_LEN], &mut shared_a).is_err());
    }
}
