//! A PostgreSQL database of a run's own, dropped at its end.

use sqlx::{Connection, Executor, PgConnection, PgPool, postgres::PgPoolOptions};

use crate::backend::database_url;

/// A database created on the server of an admin URL; dropped by [`Database::remove`], or
/// when the value is dropped (from a thread of its own, so also outside a runtime).
#[derive(Debug)]
pub struct Database {
    /// The database's name.
    pub name: String,
    /// Its URL: the admin URL with the database replaced, query string kept.
    pub url: String,
    admin_url: String,
    removed: bool,
}

impl Database {
    /// Creates database `name`, dropping one of that name first (what an interrupted run
    /// left behind).
    ///
    /// # Panics
    /// When the server cannot be reached, saying how to start it; when the statements fail.
    pub async fn create(admin_url: &str, name: &str) -> Self {
        let mut admin = connect(admin_url).await;
        admin.execute(sqlx::AssertSqlSafe(drop_sql(name))).await.expect("drop a leftover database");
        admin
            .execute(sqlx::AssertSqlSafe(format!(r#"CREATE DATABASE "{name}""#)))
            .await
            .expect("create the run's database");
        let _ = admin.close().await;
        Self {
            name: name.to_owned(),
            url: database_url(admin_url, name),
            admin_url: admin_url.to_owned(),
            removed: false,
        }
    }

    /// Creates a database named `{prefix}_{32 random hex digits}`.
    ///
    /// # Panics
    /// As [`Database::create`].
    pub async fn create_unique(admin_url: &str, prefix: &str) -> Self {
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        Self::create(admin_url, &name).await
    }

    /// A pool of at most `max_connections` on the database.
    ///
    /// # Panics
    /// When the database cannot be reached.
    pub async fn pool(&self, max_connections: u32) -> PgPool {
        PgPoolOptions::new()
            .max_connections(max_connections)
            .connect(&self.url)
            .await
            .expect("connect the run's database")
    }

    /// Drops the database, ending the sessions still on it.
    ///
    /// # Panics
    /// When the server cannot be reached or refuses.
    pub async fn remove(mut self) {
        self.removed = true;
        let mut admin = connect(&self.admin_url).await;
        admin.execute(sqlx::AssertSqlSafe(drop_sql(&self.name))).await.expect("drop the database");
        let _ = admin.close().await;
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // A drop may run inside a runtime or outside any: a thread with its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            rt.block_on(async {
                if let Ok(mut admin) = PgConnection::connect(&admin_url).await {
                    let _ = admin.execute(sqlx::AssertSqlSafe(drop_sql(&name))).await;
                    let _ = admin.close().await;
                }
            });
        })
        .join();
    }
}

async fn connect(admin_url: &str) -> PgConnection {
    PgConnection::connect(admin_url).await.unwrap_or_else(|e| {
        panic!(
            "cannot reach PostgreSQL at {admin_url} ({e}); start it (see README: `make test` \
             prepares it) or set TEST_DATABASE_URL (BENCH_DATABASE_URL for the benchmarks)"
        )
    })
}

/// The statement that drops database `name`, ending the sessions still on it.
fn drop_sql(name: &str) -> String {
    format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#)
}
