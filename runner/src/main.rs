//! `offload`: the local runner and operator tool. `offload dev` plays API
//! Gateway (serving the api router), the SQS event source mapping (feeding
//! the worker real `SqsEvent` batches and deleting what it did not report
//! failed) and EventBridge (calling the scheduler every few seconds), so the
//! Lambda code runs unchanged on a laptop.

mod dev;

use std::process::ExitCode;

use chrono::{Duration, Utc};
use clap::{Parser, Subcommand};
use offload::auth::Keys;
use offload::config::Config;
use offload::db;
use offload::ids::WorkspaceId;
use offload::workspace::{self, Role, Tier};

#[derive(Parser)]
#[command(
    name = "offload",
    version,
    about = "Offload's local runner and operator tool"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Migrate, ensure the demo workspace, print a token, and run the API,
    /// the worker loop and the scheduler until Ctrl-C.
    Dev,
    /// Apply pending migrations and say which.
    Migrate,
    /// Manage workspaces.
    Workspace {
        #[command(subcommand)]
        command: WorkspaceCommand,
    },
    /// Print a signed JWT for a user (membership is checked by the API).
    Token {
        #[arg(long)]
        workspace: WorkspaceId,
        /// The user's subject (`sub`), as their member was added: a UUID or
        /// any identity provider's id.
        #[arg(long, value_parser = parse_subject)]
        user: String,
        /// How long the token is valid: 90s, 30m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: Duration,
    },
    /// Manage platform keys (provisioning workspaces and members).
    #[command(name = "platform-key")]
    PlatformKey {
        #[command(subcommand)]
        command: PlatformKeyCommand,
    },
}

#[derive(Subcommand)]
enum WorkspaceCommand {
    /// Create a workspace and print its id.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "standard")]
        tier: Tier,
        /// A user (their subject: a UUID or any identity provider's id)
        /// who becomes an admin member.
        #[arg(long, value_parser = parse_subject)]
        owner: Option<String>,
    },
}

#[derive(Subcommand)]
enum PlatformKeyCommand {
    /// Make a platform key for a web app's server and print it (shown
    /// once, stored hashed).
    Create {
        /// What the key is for, e.g. `acme web app`.
        #[arg(long)]
        name: String,
    },
    /// List the platform keys: id, name, first characters, created, last used.
    List,
    /// Revoke a platform key: it answers 401 from its next request.
    Revoke {
        #[arg(long)]
        id: uuid::Uuid,
    },
}

/// A member's subject: 1 to 255 characters.
fn parse_subject(s: &str) -> Result<String, String> {
    let n = s.chars().count();
    if n == 0 || n > offload::auth::MAX_IDENTITY_CHARS {
        return Err(format!(
            "a user's subject is 1 to {} characters, got {n}",
            offload::auth::MAX_IDENTITY_CHARS
        ));
    }
    Ok(s.to_string())
}

/// Parses `90s`, `30m`, `1h`, `7d`.
fn parse_ttl(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration like 90s, 30m, 1h or 7d");
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: i64 = num.parse().map_err(|_| bad())?;
    let d = match unit {
        "s" => Duration::seconds(n),
        "m" => Duration::minutes(n),
        "h" => Duration::hours(n),
        "d" => Duration::days(n),
        _ => return Err(bad()),
    };
    if n <= 0 || d > Duration::days(366) {
        return Err(format!("{s:?}: a token lives from 1 second to 366 days"));
    }
    Ok(d)
}

#[tokio::main]
async fn main() -> ExitCode {
    offload::telemetry::init(false);
    let cli = Cli::parse();
    let mut config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("offload: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    // `dev` reads the secrets as it connects; the one-shot commands read them here.
    if !matches!(cli.command, Command::Dev) {
        if let Err(e) = offload::startup::resolve_secrets(&mut config).await {
            eprintln!("offload: configuration error: {e}");
            return ExitCode::from(2);
        }
    }
    let result = match cli.command {
        Command::Dev => dev::run(config).await,
        Command::Migrate => migrate(&config).await.map(|applied| {
            if applied.is_empty() {
                println!("schema is up to date (version {})", db::required_version());
            } else {
                for m in applied {
                    println!("applied {m}");
                }
            }
        }),
        Command::Workspace {
            command: WorkspaceCommand::Create { name, tier, owner },
        } => create_workspace(&config, &name, tier, owner).await,
        Command::PlatformKey { command } => platform_key(&config, command).await,
        Command::Token {
            workspace: _,
            user,
            ttl,
        } => {
            let now = Utc::now();
            match Keys::from_config(&config) {
                Some(keys) => {
                    println!("{}", keys.issue_for(&user, now, now + ttl));
                    Ok(())
                }
                None => Err(anyhow::anyhow!(
                    "tokens are signed with OFFLOAD_JWT_SECRET (or OFFLOAD_JWT_SECRET_ARN), \
                     and neither is set"
                )),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("offload: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Creates the database if needed and applies every pending migration.
pub(crate) async fn migrate(config: &Config) -> anyhow::Result<Vec<String>> {
    if db::ensure_database(&config.database_url).await? {
        eprintln!("created database {}", db::describe(&config.database_url));
    }
    Ok(db::migrate(&config.database_url).await?)
}

async fn create_workspace(
    config: &Config,
    name: &str,
    tier: Tier,
    owner: Option<String>,
) -> anyhow::Result<()> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        anyhow::bail!("--name must be 1 to 200 characters");
    }
    let pool = db::pool(&config.database_url, 1)?;
    db::check_schema(&pool).await?;
    let client = pool.get().await?;
    let id = WorkspaceId::new();
    workspace::ensure_workspace(&**client, id, name, tier).await?;
    if let Some(owner) = owner {
        workspace::put_member(&**client, id, &owner, None, Role::Admin).await?;
    }
    println!("{id}");
    Ok(())
}

async fn platform_key(config: &Config, command: PlatformKeyCommand) -> anyhow::Result<()> {
    let pool = db::pool(&config.database_url, 1)?;
    db::check_schema(&pool).await?;
    let client = pool.get().await?;
    match command {
        PlatformKeyCommand::Create { name } => {
            let name = name.trim();
            if name.is_empty() || name.chars().count() > 200 {
                anyhow::bail!("--name must be 1 to 200 characters");
            }
            let (_, secret) = offload::platform::create_key(&**client, name).await?;
            println!("{secret}");
        }
        PlatformKeyCommand::List => {
            for (key, used) in offload::platform::list_keys(&**client).await? {
                let used = used.map_or("never".to_string(), |t| t.to_rfc3339());
                println!(
                    "{}\t{}\t{}\t{}\t{used}",
                    key.id,
                    key.name,
                    key.prefix,
                    key.created_at.to_rfc3339()
                );
            }
        }
        PlatformKeyCommand::Revoke { id } => {
            if !offload::platform::revoke_key(&**client, id).await? {
                anyhow::bail!("no platform key {id} (offload platform-key list shows them)");
            }
            println!("revoked {id}");
        }
    }
    Ok(())
}
