//! Calls of keys in a PKCS#11 token run on a pool of their own (`service.rs`): a token's
//! call may wait milliseconds on the device, and on the crypto pool (one thread per core)
//! it held up every software key's signatures and batches queued behind it. The service on
//! a real SoftHSM2 token routes each kind of call by its key, and the calls it routes to
//! the token pool are answered.
//!
//! One test: the process's SoftHSM2 configuration is set once (`common::softhsm`).

#![allow(clippy::unwrap_used)]

mod common;

use common::Disk;
use common::softhsm::{Token, hsm_key, me};
use kms_shared::model::{KeyType, Protection, SignScheme};
use kms_shared::protocol::{PlaintextItem, Request, Response};
use kmsd::service::Service;
use std::sync::Arc;

fn sign(key: &str) -> Request {
    Request::Sign {
        key: key.into(),
        message: b"message".to_vec(),
        scheme: SignScheme::Pss,
    }
}

fn encrypt(key: &str) -> Request {
    Request::Encrypt {
        key: key.into(),
        plaintext: b"plaintext".to_vec().into(),
        context: None,
    }
}

#[test]
fn token_calls_run_on_a_pool_of_their_own() {
    let token = Token::new("kms-pool");
    let disk = Disk::default();
    let engine = Arc::new(token.engine_on(&disk));
    let c = me();
    for (name, key_type) in [
        ("tok-ec", KeyType::Ecdsa),
        ("tok-aes", KeyType::Aes256),
        ("tok-rsa", KeyType::Rsa2048),
    ] {
        engine.create_key(&c, &hsm_key(name, key_type)).unwrap();
    }
    for (name, key_type) in [("soft-ec", KeyType::Ecdsa), ("soft-aes", KeyType::Aes256)] {
        let mut spec = hsm_key(name, key_type);
        spec.protection = Protection::Basic;
        engine.create_key(&c, &spec).unwrap();
    }
    let service = Service::new(
        engine.clone(),
        "/nonexistent".into(),
        "/nonexistent".into(),
        64,
        64 << 20,
    )
    .unwrap();

    let tag = engine.resolve("tok-ec").unwrap().rec.tag.clone();
    let routed = [
        (sign("tok-ec"), true),
        (sign(&tag), true),
        (sign("soft-ec"), false),
        (encrypt("tok-aes"), true),
        (encrypt("soft-aes"), false),
        (
            Request::EncryptBatch {
                key: "tok-aes".into(),
                items: vec![PlaintextItem {
                    plaintext: b"x".to_vec().into(),
                    context: None,
                }],
            },
            true,
        ),
        (
            Request::PublicKey {
                key: "tok-rsa".into(),
                version: None,
            },
            true,
        ),
        (
            Request::DataKey {
                key: "tok-aes".into(),
                bits: 256,
                plaintext: false,
                context: None,
            },
            true,
        ),
        (sign("no-such-key"), false),
        (
            Request::GetKey {
                key: "tok-ec".into(),
            },
            false,
        ),
    ];
    for (req, on_token) in &routed {
        assert_eq!(service.runs_on_token_pool(req), *on_token, "{}", req.kind());
    }

    // The token pool answers: a signature made there verifies, a ciphertext decrypts.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let Ok(Response::Signature { signature }) = service.handle(&c, sign("tok-ec")).await else {
            panic!("no signature")
        };
        let verify = Request::Verify {
            key: "tok-ec".into(),
            message: b"message".to_vec(),
            signature,
            scheme: SignScheme::Pss,
        };
        assert!(matches!(
            service.handle(&c, verify).await,
            Ok(Response::Verified { valid: true })
        ));
        let Ok(Response::Ciphertext { ciphertext }) = service.handle(&c, encrypt("tok-aes")).await
        else {
            panic!("no ciphertext")
        };
        let decrypt = Request::Decrypt {
            key: "tok-aes".into(),
            ciphertext,
            context: None,
        };
        let Ok(Response::Plaintext { plaintext }) = service.handle(&c, decrypt).await else {
            panic!("no plaintext")
        };
        assert_eq!(&plaintext[..], b"plaintext");
        let batch = Request::EncryptBatch {
            key: "tok-aes".into(),
            items: vec![PlaintextItem {
                plaintext: b"x".to_vec().into(),
                context: None,
            }],
        };
        assert!(matches!(
            service.handle(&c, batch).await,
            Ok(Response::Batch { .. })
        ));
        for soft in [sign("soft-ec"), encrypt("soft-aes")] {
            assert!(service.handle(&c, soft).await.is_ok());
        }
    });
    // And as a connection starts its calls, without a task.
    let caller = Arc::new(c);
    for key in ["tok-ec", "soft-ec"] {
        let (tx, rx) = std::sync::mpsc::channel();
        let started = service.start(&caller, sign(key), move |reply, _durable| {
            let _ = tx.send(reply.is_ok());
        });
        assert!(started.is_ok(), "{key}: handed back");
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(30)),
            Ok(true),
            "{key}"
        );
    }
    // Where they ran, counted on the threads themselves: the token keys' sign, verify,
    // encrypt, decrypt and batch through `handle`, and the sign through `start`; none of
    // the software keys' calls.
    assert_eq!(service.calls_run_on_token_threads(), 6);
}
