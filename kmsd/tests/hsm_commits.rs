//! HSM key material against commits that fail (SPEC §9, docs/RELIABILITY.md item 26): the
//! engine on a real SoftHSM2 token and an in-memory disk that fails on command. Token
//! objects are destroyed only once the store no longer needs them: a purge is committed
//! first and its objects destroyed after it (and at the next start if that did not
//! happen), and the objects of a rotation whose commit failed but may have been stored
//! are kept.
//!
//! One test: the process's SoftHSM2 configuration is set once (`common::softhsm`).

#![allow(clippy::unwrap_used)]

mod common;

use common::Disk;
use common::softhsm::{Token, hsm_key, me};
use kms_shared::model::{KeyState, KeyType};
use kms_shared::protocol::ErrorKind;

#[test]
fn token_objects_outlive_every_commit_that_may_need_them() {
    let token = Token::new("kms-commits");
    // Before the library is loaded, which lists the tokens it finds then (8.).
    let (dedicated_module, dedicated_pin) = token.another("kms-dedicated");
    let c = me();

    // 1. A rotation whose commit fails after its header was written, with nothing able to
    //    confirm it (every fsync fails from then on: a commit that confirms it is a
    //    success, `a_change_that_landed_despite_its_error_is_confirmed_and_served`): the
    //    caller gets an error, but the store has the new version, so its objects must stay.
    let disk = Disk::default();
    let e = token.engine_on(&disk);
    e.create_key(&c, &hsm_key("rot", KeyType::Aes256)).unwrap();
    e.rotate(&c, "rot").unwrap();
    assert_eq!(token.objects(), 2);
    disk.fail_commit_after_header_then_syncs();
    let err = e.rotate(&c, "rot").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
    assert!(err.to_string().contains("may have been stored"), "{err}");
    assert_eq!(
        token.objects(),
        3,
        "the failed rotation's objects were destroyed"
    );
    disk.syncs_fail
        .store(false, std::sync::atomic::Ordering::SeqCst);
    drop(e.close());
    let e = token.engine_on(&disk);
    let k = e.get_key("rot").unwrap();
    assert_eq!(
        k.current_version, 3,
        "precondition: the failed commit was stored"
    );
    let ct = e.encrypt(&c, "rot", b"under v3", None).wait().unwrap();
    assert_eq!(e.decrypt(&c, "rot", &ct, None).wait().unwrap(), b"under v3");

    // 2. A purge whose commit fails and was not stored (the disk is full): the key can be
    //    cancelled back to use with all its material. It used to lose it: the objects
    //    were destroyed before the commit.
    e.create_key(&c, &hsm_key("kept", KeyType::Aes256)).unwrap();
    let ct = e.encrypt(&c, "kept", b"still here", None).wait().unwrap();
    e.request_deletion(&c, "kept").unwrap();
    let objects = token.objects();
    disk.full.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        e.delete_now(&c, "kept").unwrap_err().kind(),
        ErrorKind::Internal
    );
    disk.full.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(token.objects(), objects);
    // The handle reopens the store at most every 200 ms after a failed reopen.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while let Err(err) = e.cancel_deletion(&c, "kept") {
        assert!(std::time::Instant::now() < deadline, "no recovery: {err}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    e.enable(&c, "kept").unwrap();
    assert_eq!(
        e.decrypt(&c, "kept", &ct, None).wait().unwrap(),
        b"still here"
    );

    // 3. A purge whose commit fails after its header was written, unconfirmed (as in 1.):
    //    stored, but the objects were not destroyed (the caller got an error). They are still there, and the next
    //    start destroys them (the key's due task), then forgets their references.
    let kept = e.request_deletion(&c, "kept").unwrap().tag;
    let before_purge = token.objects();
    disk.fail_commit_after_header_then_syncs();
    let err = e.delete_now(&c, "kept").unwrap_err();
    assert!(err.to_string().contains("may have been stored"), "{err}");
    assert_eq!(token.objects(), before_purge);
    disk.syncs_fail
        .store(false, std::sync::atomic::Ordering::SeqCst);
    drop(e.close());
    let e = token.engine_on(&disk);
    assert_eq!(e.get_key(&kept).unwrap().state, KeyState::Deleted);
    assert_eq!(
        token.objects(),
        before_purge,
        "destroyed before the due task ran"
    );
    assert_eq!(e.run_due(), 1);
    assert_eq!(token.objects(), before_purge - 1, "kept's one AES object");
    assert_eq!(e.run_due(), 0, "the task is done once");
    drop(e.close());
    let e = token.engine_on(&disk);
    assert_eq!(e.run_due(), 0, "and stays done across a restart");

    // 4. A purge that works destroys the objects at once.
    let before = token.objects();
    e.request_deletion(&c, "rot").unwrap();
    e.delete_now(&c, "rot").unwrap();
    assert_eq!(token.objects(), before - 3, "rot's three versions");

    // 5. A purge whose commit fails after its header was written and is then confirmed:
    //    a success, and its objects go at once, as in 4.
    e.create_key(&c, &hsm_key("confirmed", KeyType::Aes256))
        .unwrap();
    e.request_deletion(&c, "confirmed").unwrap();
    let before = token.objects();
    disk.fail_commit_after_header();
    e.delete_now(&c, "confirmed").unwrap();
    assert_eq!(token.objects(), before - 1, "confirmed's one AES object");
    drop(e.close());

    // 6. The purge at the end of the deletion wait does not wait for an absent token
    //    (NCP: a key is deleted when its wait ends): it is committed, and the key's
    //    objects are destroyed once the token is back. It used to leave the key
    //    `pending-deletion` past its wait, where it could not be cancelled either.
    let (e, clock) = token.engine_and_clock_on(&disk);
    let tag = e
        .create_key(&c, &hsm_key("unplugged", KeyType::Aes256))
        .unwrap()
        .tag;
    e.request_deletion(&c, &tag).unwrap();
    let before = token.objects();
    token.take_away();
    clock.advance(72 * 3_600_000 + 1);
    let mut events = e.subscribe();
    assert_eq!(e.run_due(), 1, "the purge waited for the token");
    assert_eq!(e.get_key(&tag).unwrap().state, KeyState::Deleted);
    assert_eq!(token.objects(), before, "destroyed in an absent token");
    // Its event does not say the material is destroyed: it is not yet.
    let purged = events.try_recv().unwrap();
    assert_eq!(purged.kind, kms_shared::protocol::EventKind::Purged);
    assert!(
        purged
            .message
            .contains("destroyed as soon as the token can be reached"),
        "{}",
        purged.message
    );
    token.put_back();
    // The engine retries with backoff on its clock, and looks for a token that went
    // away at most once a second (then 2 s, 4 s, …) of real time.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while token.objects() != before - 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the purged key's object was not destroyed once the token was back"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
        clock.advance(3_600_000);
        e.run_due();
    }
    drop(e.close());
    let e = token.engine_on(&disk);
    assert_eq!(e.run_due(), 0, "nothing is left to destroy after a restart");
    assert_eq!(token.objects(), before - 1);

    // 7. Creates of one name at once: a key is generated outside the lifecycle lock (a
    //    slow token must not hold up the other changes), so creates that lose the race
    //    for the name after generating theirs destroy what they generated.
    let before = token.objects();
    let barrier = std::sync::Barrier::new(8);
    let made: Vec<bool> = std::thread::scope(|s| {
        let racers: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    match e.create_key(&c, &hsm_key("racer", KeyType::Aes256)) {
                        Ok(_) => true,
                        Err(err) => {
                            assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
                            false
                        }
                    }
                })
            })
            .collect();
        racers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    assert_eq!(made.iter().filter(|m| **m).count(), 1, "{made:?}");
    assert_eq!(
        token.objects(),
        before + 1,
        "the losers' keys stayed in the token"
    );

    // 8. A dedicated token removed while a key is generated on it: the create is refused
    //    (and what it generated destroyed) rather than committing a key on a token the
    //    daemon no longer knows, which no call could use or purge. Raced a number of times:
    //    the removal lands before, during or after the generation.
    let pin = dedicated_pin.to_str().unwrap();
    for round in 0..40 {
        let before = token.objects();
        e.hsm_add(&c, "ded", dedicated_module, "kms-dedicated", pin)
            .unwrap();
        let mut spec = hsm_key(&format!("ded{round}"), KeyType::Aes256);
        spec.protection = kms_shared::model::Protection::DedicatedHsm;
        spec.hsm = Some("ded".into());
        let barrier = std::sync::Barrier::new(2);
        let (created, removed) = std::thread::scope(|s| {
            let create = s.spawn(|| {
                barrier.wait();
                e.create_key(&c, &spec)
            });
            let remove = s.spawn(|| {
                barrier.wait();
                e.hsm_remove(&c, "ded")
            });
            (create.join().unwrap(), remove.join().unwrap())
        });
        match (created, removed) {
            // The key first: the token holds it, and is not removed.
            (Ok(k), Err(r)) => {
                assert_eq!(r.kind(), ErrorKind::InvalidState, "{r}");
                assert_eq!(token.objects(), before + 1);
                e.request_deletion(&c, &k.tag).unwrap();
                e.delete_now(&c, &k.tag).unwrap();
                e.hsm_remove(&c, "ded").unwrap();
            }
            (Err(k), Ok(_)) => {
                assert_eq!(k.kind(), ErrorKind::NotFound, "round {round}: {k}");
            }
            other => panic!("round {round}: {other:?}"),
        }
        assert_eq!(token.objects(), before, "round {round}: objects left");
    }
    drop(e.close());
}
