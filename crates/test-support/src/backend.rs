//! Where the PostgreSQL server and the RabbitMQ broker of a run are.

/// The local PostgreSQL `make test` prepares, its `postgres` database.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The local RabbitMQ `make test` prepares, its default vhost.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The servers a run uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backends {
    /// A database URL to connect to for creating and dropping a run's databases.
    pub admin_url: String,
    /// The broker URL, for the service and for the run's own connections.
    pub amqp_url: String,
}

impl Backends {
    /// `{prefix}_DATABASE_URL` and `{prefix}_AMQP_URL` (`TEST_…` for the tests, `BENCH_…`
    /// for the benchmarks), each [`DEFAULT_DATABASE_URL`] or [`DEFAULT_AMQP_URL`] when unset.
    pub fn from_env(prefix: &str) -> Self {
        let var = |name: &str, default: &str| {
            std::env::var(format!("{prefix}_{name}")).unwrap_or_else(|_| default.to_owned())
        };
        Self {
            admin_url: var("DATABASE_URL", DEFAULT_DATABASE_URL),
            amqp_url: var("AMQP_URL", DEFAULT_AMQP_URL),
        }
    }
}

/// `admin_url` with its database replaced by `name`, keeping its query string
/// (`?sslmode=…`, `?options=…`) and everything before the path.
pub fn database_url(admin_url: &str, name: &str) -> String {
    let (base, query) = admin_url.split_once('?').map_or((admin_url, None), |(b, q)| (b, Some(q)));
    let authority_starts = base.find("://").map_or(0, |i| i + 3);
    let root = match base[authority_starts..].find('/') {
        Some(i) => &base[..authority_starts + i],
        None => base,
    };
    match query {
        Some(q) => format!("{root}/{name}?{q}"),
        None => format!("{root}/{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::database_url;

    #[test]
    fn the_database_is_replaced_and_the_query_string_kept() {
        let cases = [
            ("postgres://postgres@127.0.0.1:5432/postgres", "postgres://postgres@127.0.0.1:5432/t"),
            (
                "postgres://u:p@db:5432/postgres?sslmode=disable",
                "postgres://u:p@db:5432/t?sslmode=disable",
            ),
            ("postgres://postgres@127.0.0.1:5432", "postgres://postgres@127.0.0.1:5432/t"),
            ("postgres://h/?options=-c%20a%3Db", "postgres://h/t?options=-c%20a%3Db"),
        ];

        for (admin, want) in cases {
            assert_eq!(database_url(admin, "t"), want, "{admin}");
        }
    }
}
