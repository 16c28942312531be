//! Desktop notifications (SPEC §8) through notify-rust, behind the default
//! `desktop-notifications` feature. Without a D-Bus session bus there is nobody to show
//! them: the event is already on the message line, so nothing else is done, and a
//! failing notification daemon is ignored for the same reason.

/// Whether notifications can be shown at all in this session.
pub fn available() -> bool {
    cfg!(feature = "desktop-notifications")
        && std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_some_and(|v| !v.is_empty())
}

/// Shows a notification without blocking the caller.
pub fn send(summary: String, body: String) {
    if !available() {
        return;
    }
    #[cfg(feature = "desktop-notifications")]
    {
        // A plain thread: D-Bus may be slow or hang, and the UI must not wait for it,
        // nor must quitting wait for it.
        let _ = std::thread::Builder::new()
            .name("notify".into())
            .spawn(move || {
                let _ = notify_rust::Notification::new()
                    .appname(super::strings::NOTIFY_APP)
                    .summary(&summary)
                    .body(&body)
                    .show();
            });
    }
    #[cfg(not(feature = "desktop-notifications"))]
    let _ = (summary, body);
}
