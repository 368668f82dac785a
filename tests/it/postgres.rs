//! Migrations and the database's own guarantees.

use test_support::Database;

use crate::helpers::{BIN, Seed, repo_path, run_to_end, seed, test_db};

pub async fn migrate(db: &Database) -> std::process::Output {
    run_to_end(
        tokio::process::Command::new(BIN)
            .arg("-conf")
            .arg(repo_path("configs"))
            .arg("migrate")
            .env("RESOURCE_DATA__DATABASE__SOURCE", &db.url)
            .env("RESOURCE_DATA__DATABASE__CONNECT_TIMEOUT", "5s"),
    )
    .await
}

#[tokio::test]
async fn migrate_creates_the_schema_and_is_idempotent() {
    let db = test_db().await;

    let first = migrate(&db).await;
    let second = migrate(&db).await;

    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    assert!(second.status.success(), "{}", String::from_utf8_lossy(&second.stderr));
    let pool = db.pool(4).await;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for t in ["audit_logs", "instance_specs", "instances"] {
        assert!(tables.contains(&t.to_owned()), "{t} missing from {tables:?}");
    }
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(applied as usize, std::fs::read_dir(repo_path("migrations")).unwrap().count());
}

#[tokio::test]
async fn migrate_against_an_unreachable_database_fails_with_exit_69() {
    let out = run_to_end(
        tokio::process::Command::new(BIN)
            .arg("-conf")
            .arg(repo_path("configs"))
            .arg("migrate")
            .env(
                "RESOURCE_DATA__DATABASE__SOURCE",
                "postgres://postgres:pw-not-logged@127.0.0.1:1/x",
            )
            .env("RESOURCE_DATA__DATABASE__CONNECT_TIMEOUT", "300ms"),
    )
    .await;

    assert_eq!(out.status.code(), Some(69));
    let all =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(all.contains("cannot reach the database"), "{all}");
    assert!(!all.contains("pw-not-logged"), "{all}");
}

#[tokio::test]
async fn the_audit_log_refuses_update_delete_and_truncate() {
    let db = test_db().await;
    assert!(migrate(&db).await.status.success());
    let pool = db.pool(4).await;
    sqlx::query(
        "INSERT INTO audit_logs (instance_id, actor, source, action, outcome) VALUES (1, 'mq', 'mq', 'CREATE', 'ok')",
    )
    .execute(&pool)
    .await
    .unwrap();

    for sql in [
        "UPDATE audit_logs SET reason = 'rewritten'",
        "DELETE FROM audit_logs",
        "TRUNCATE audit_logs",
    ] {
        let err = sqlx::query(sql).execute(&pool).await.expect_err(sql);
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    let count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_logs").fetch_one(&pool).await.unwrap();
    assert_eq!(count, 1);
}

#[tokio::test]
async fn the_schema_refuses_inconsistent_rows() {
    let db = test_db().await;
    assert!(migrate(&db).await.status.success());
    let pool = db.pool(4).await;
    seed(&pool, &[Seed::new(1)]).await;

    let bad = [
        "INSERT INTO instances (instance_id, user_id, name, status) VALUES (2, 'u', 'n', 'PAUSED')",
        "INSERT INTO instances (instance_id, user_id, name, status) VALUES (0, 'u', 'n', 'RUNNING')",
        "INSERT INTO instances (instance_id, user_id, name, status) VALUES (3, 'u', 'n', 'DELETED')",
        "INSERT INTO instance_specs (instance_id, cpu, memory, image) VALUES (999, 1, 1, 'x')",
        "UPDATE instance_specs SET cpu = 0 WHERE instance_id = 1",
        "UPDATE instance_specs SET config_json = '[1]' WHERE instance_id = 1",
    ];
    for sql in bad {
        assert!(sqlx::query(sql).execute(&pool).await.is_err(), "accepted: {sql}");
    }
}
