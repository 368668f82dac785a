//! Who may see and change which instances: a user their own, an admin every one.

use super::{Error, Instance, instance::validate_text};

/// A caller as the rules see them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// The caller's user id.
    pub user_id: String,
    /// Sees and acts on every instance.
    pub admin: bool,
}

/// Which owners' instances a list shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListScope {
    /// Only this owner's (`None`: every owner's).
    Owner(Option<String>),
    /// Nothing: a user asked for another user's instances, which are not there for them.
    Nothing,
}

impl Access {
    /// Whether `instance` exists for this caller.
    pub fn sees(&self, instance: &Instance) -> bool {
        self.admin || instance.user_id == self.user_id
    }

    /// The owner of an instance this caller creates: the one asked for (an admin only may
    /// name another user), or the caller.
    ///
    /// # Errors
    /// `PermissionDenied` when a user names another user.
    pub fn owner_of_new(&self, asked: Option<String>) -> Result<String, Error> {
        match asked {
            None => Ok(self.user_id.clone()),
            Some(owner) if self.admin || owner == self.user_id => Ok(owner),
            Some(_) => Err(Error::PermissionDenied {
                message: "only an admin creates instances for another user".into(),
            }),
        }
    }

    /// Whose instances a list asking for `asked` (`None`: anyone's) shows.
    pub fn list_scope(&self, asked: Option<String>) -> ListScope {
        match asked {
            _ if self.admin => ListScope::Owner(asked),
            Some(owner) if owner != self.user_id => ListScope::Nothing,
            _ => ListScope::Owner(Some(self.user_id.clone())),
        }
    }
}

/// Whether `id` can be a user id (an identity provider's `sub`): non-empty text within
/// the bounds every stored identifier keeps.
pub fn is_user_id(id: &str) -> bool {
    !id.is_empty() && validate_text("sub", id).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str) -> Access {
        Access { user_id: id.into(), admin: false }
    }

    #[test]
    fn a_user_creates_for_themselves_and_an_admin_for_anyone() {
        let admin = Access { user_id: "root".into(), admin: true };
        assert_eq!(user("u1").owner_of_new(None).unwrap(), "u1");
        assert_eq!(user("u1").owner_of_new(Some("u1".into())).unwrap(), "u1");
        assert!(matches!(
            user("u1").owner_of_new(Some("u2".into())),
            Err(Error::PermissionDenied { .. })
        ));
        assert_eq!(admin.owner_of_new(Some("u2".into())).unwrap(), "u2");
        assert_eq!(admin.owner_of_new(None).unwrap(), "root");
    }

    #[test]
    fn a_user_lists_their_own_and_an_admin_what_they_ask_for() {
        let admin = Access { user_id: "root".into(), admin: true };
        assert_eq!(user("u1").list_scope(None), ListScope::Owner(Some("u1".into())));
        assert_eq!(user("u1").list_scope(Some("u1".into())), ListScope::Owner(Some("u1".into())));
        assert_eq!(user("u1").list_scope(Some("u2".into())), ListScope::Nothing);
        assert_eq!(admin.list_scope(None), ListScope::Owner(None));
        assert_eq!(admin.list_scope(Some("u2".into())), ListScope::Owner(Some("u2".into())));
    }

    #[test]
    fn user_ids_are_bounded_text() {
        assert!(is_user_id("auth0|5f7c8ec7c33c6c004bbafe82"));
        assert!(!is_user_id(""));
        assert!(!is_user_id("a\u{0}b"));
        assert!(!is_user_id(&"x".repeat(10_000)));
    }
}
