//! Discovery on etcd: placeholder, replaced in the next commit.
