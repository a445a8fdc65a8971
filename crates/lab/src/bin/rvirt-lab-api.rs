//! `rvirt-lab-api SOCKET COMMAND`: sends one control-API request and prints
//! the JSON response. A test tool for the lab, where no socat is available;
//! exits non-zero when the request fails.

use std::process::ExitCode;
use std::time::Duration;

use rvirt_api::{parse_request, ApiClient};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(sock), Some(cmd)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: rvirt-lab-api SOCKET COMMAND|JSON");
        return ExitCode::from(2);
    };
    let json = if cmd.starts_with('{') { cmd.clone() } else { format!("{{\"command\":\"{cmd}\"}}") };
    let req = match parse_request(&json) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rvirt-lab-api: {e}");
            return ExitCode::from(2);
        }
    };
    match ApiClient::connect(sock, Duration::from_secs(30)).and_then(|mut c| c.call(&req)) {
        Ok(resp) => {
            println!("{}", serde_json::to_string(&resp).unwrap_or_default());
            if resp.ok { ExitCode::SUCCESS } else { ExitCode::from(1) }
        }
        Err(e) => {
            eprintln!("rvirt-lab-api: {e}");
            ExitCode::from(1)
        }
    }
}
