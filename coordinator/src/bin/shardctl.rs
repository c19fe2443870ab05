//! `shardctl`: the operator CLI of shardserve.

#[tokio::main]
async fn main() {
    let code = shardserve_coordinator::cli::main().await;
    std::process::exit(code);
}
