//! How the experts are used: counts of top-k selections per block, pooled
//! or split by a question group (CLEVR question type, VQA answer type), and
//! how much the groups differ in the experts they choose.
//!
//! The paper (section 2) treats each path as a module "which should
//! potentially be used for a specific function"; [`specialisation`] puts a
//! number on whether a trained gate does that for the question groups the
//! data names.

use std::collections::BTreeMap;

/// Selections per block and expert (`[block][expert]`), one per question
/// and selected path.
pub type Usage = Vec<Vec<u64>>;

/// Adds one sample's selected experts in `block` (its gate's top-k
/// indices) to `usage`, growing it to that block and `paths` experts.
pub fn add_selections(usage: &mut Usage, block: usize, paths: usize, selected: &[usize]) {
    if usage.len() <= block {
        usage.resize_with(block + 1, Vec::new);
    }
    let row = &mut usage[block];
    if row.len() < paths {
        row.resize(paths, 0);
    }
    for &e in selected {
        row[e] += 1;
    }
}

/// Per block: how far each group's choice of experts is from all groups'
/// together, as the total-variation distance between the group's share of
/// selections per expert and the pooled share, averaged over the groups
/// weighted by their selections. 0 when every group chooses the experts in
/// the same proportions; 1 is out of reach (the pooled shares include the
/// group's own). Groups with no selection in a block are left out of it.
///
/// With n questions in a group the shares carry sampling noise, so even
/// gates blind to the group give about `sqrt(P / (n k)) / 2` rather than 0.
pub fn specialisation(by_group: &BTreeMap<String, Usage>) -> Vec<f64> {
    let blocks = by_group.values().map(Vec::len).max().unwrap_or(0);
    (0..blocks)
        .map(|b| {
            let rows: Vec<&[u64]> = by_group
                .values()
                .filter_map(|u| u.get(b).map(Vec::as_slice))
                .filter(|r| r.iter().sum::<u64>() > 0)
                .collect();
            let paths = rows.iter().map(|r| r.len()).max().unwrap_or(0);
            let mut pooled = vec![0u64; paths];
            for r in &rows {
                for (p, &c) in pooled.iter_mut().zip(r.iter()) {
                    *p += c;
                }
            }
            let total: u64 = pooled.iter().sum();
            if total == 0 {
                return 0.0;
            }
            let weighted: f64 = rows
                .iter()
                .map(|r| {
                    let n: u64 = r.iter().sum();
                    let tv: f64 = (0..paths)
                        .map(|e| {
                            let own = r.get(e).copied().unwrap_or(0) as f64 / n as f64;
                            (own - pooled[e] as f64 / total as f64).abs()
                        })
                        .sum::<f64>()
                        / 2.0;
                    tv * n as f64
                })
                .sum();
            weighted / total as f64
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups(rows: &[(&str, Usage)]) -> BTreeMap<String, Usage> {
        rows.iter()
            .map(|(n, u)| (n.to_string(), u.clone()))
            .collect()
    }

    #[test]
    fn selections_add_up_per_block_and_expert() {
        let mut u = Usage::new();
        add_selections(&mut u, 1, 4, &[0, 3]);
        add_selections(&mut u, 1, 4, &[3, 2]);
        add_selections(&mut u, 0, 4, &[1]);
        assert_eq!(u, vec![vec![0, 1, 0, 0], vec![1, 0, 1, 2]]);
    }

    #[test]
    fn specialisation_by_hand() {
        // Same proportions (different sizes): 0.
        let same = groups(&[("a", vec![vec![2, 2, 4]]), ("b", vec![vec![1, 1, 2]])]);
        assert_eq!(specialisation(&same), vec![0.0]);
        // Two equal groups on disjoint experts: pooled [1/4; 4], each
        // group's TV = (2 * 1/4 + 2 * 1/4) / 2 = 0.5.
        let apart = groups(&[("a", vec![vec![5, 5, 0, 0]]), ("b", vec![vec![0, 0, 5, 5]])]);
        assert_eq!(specialisation(&apart), vec![0.5]);
        // Unequal: a = [3, 1] (n 4), b = [0, 4] (n 4), pooled [3/8, 5/8];
        // TV(a) = (|3/4 - 3/8| + |1/4 - 5/8|) / 2 = 3/8, TV(b) = 3/8.
        let mixed = groups(&[("a", vec![vec![3, 1]]), ("b", vec![vec![0, 4]])]);
        assert_eq!(specialisation(&mixed), vec![0.375]);
        // Weighted by selections: a = [2, 0] (n 2), b = [2, 4] (n 6),
        // pooled [1/2, 1/2]; TV(a) = 1/2, TV(b) = 1/6;
        // (2 * 1/2 + 6 * 1/6) / 8 = 1/4. Block by block; an empty group
        // is left out.
        let two = groups(&[
            ("a", vec![vec![2, 0], vec![1, 1]]),
            ("b", vec![vec![2, 4], vec![3, 3]]),
            ("c", vec![vec![0, 0]]),
        ]);
        let s = specialisation(&two);
        assert!((s[0] - 0.25).abs() < 1e-12 && s[1] == 0.0, "{s:?}");
        assert!(specialisation(&BTreeMap::new()).is_empty());
    }
}
