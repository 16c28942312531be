//! A test helper: keeps one connection to kmsd open and, for each line on stdin, encrypts
//! under KEY and prints `ok` or the error kind. Lets a test change a grant between two
//! calls of the same connection (run as another account with setpriv).
//!
//! Usage: kms-probe SOCKET KEY

use std::io::BufRead;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(socket), Some(key)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: kms-probe SOCKET KEY");
    };
    let client = kms_shared::client::Client::connect(std::path::Path::new(&socket)).await?;
    for line in std::io::stdin().lock().lines() {
        line?;
        let answer = match client.encrypt(&key, b"probe", None).await {
            Ok(_) => "ok".to_string(),
            Err(e) => e
                .kind()
                .map_or_else(|| e.to_string(), |k| k.as_str().to_string()),
        };
        println!("{answer}");
    }
    Ok(())
}
