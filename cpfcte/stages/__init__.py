"""The stages that run the method on datasets and write run folders:

    train             stage 1: CPF-CTE on image-level labels (Sec. 4.2)
    pseudo_labels     stage 2: the BPM and its CRF, scored (Table 1, Fig. 5)
    pseudo_runs       where a pseudo-label run's labels are (what DeepLabv2 reads)
    evidence          where each class's image score comes from (from stage 2's own pass)
    crf_pool          the CRF over a folder, in one crash-tolerant process pool
    deeplab_data      DeepLabv2's training crops and sampler
    deeplab_train     stage 3: DeepLabv2 on the pseudo labels
    deeplab_predict   stage 3: its test-time levels, scored (Tables 2, 3)
    predict           any folder of images, with a stage-1 or DeepLabv2 run
    explore           the patch-score explorer (notebook 08)
    walkthrough       one image through the method, step by step (notebook 09)
    export            the VOC test-server archive
"""
